//! The kernel layer: where the hot matrix work runs. Two backends behind one choice, `auto | gpu | cpu`:
//!
//! - **CPU**: the generator's own kernels (src/llm/quant.rs: scalar `_ref` twins, wasm simd128, AVX2), always there.
//! - **GPU**: WebGPU through wgpu (Vulkan/Metal/DX12 natively, `navigator.gpu` in browsers), WGSL compute shaders
//!   that dequantize the GGUF formats inside the shader (src/kernels/wgsl/). Feature `gpu`.
//!
//! `auto` takes the GPU when an adapter answers and falls back to the CPU (never a panic: in wasm a panic kills
//! the instance) when there is none — Node, edge workers, browsers without WebGPU — and says which it chose.

#[cfg(feature = "gpu")]
pub mod gpu;

/// Run a future to completion on the current thread. Native only: wgpu's futures complete once the device is
/// polled, which the code awaiting them does itself; the CPU path never waits.
#[cfg(not(target_arch = "wasm32"))]
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::yield_now();
    }
}

/// Which backend a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DevicePref {
    /// The GPU when one answers, else the CPU.
    #[default]
    Auto,
    /// The GPU, or an error.
    Gpu,
    /// The CPU.
    Cpu,
}

impl std::str::FromStr for DevicePref {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<DevicePref> {
        match s {
            "auto" => Ok(DevicePref::Auto),
            "gpu" | "webgpu" => Ok(DevicePref::Gpu),
            "cpu" => Ok(DevicePref::Cpu),
            other => Err(crate::Error::Config(format!(
                "device {other:?}: expected auto, gpu (webgpu) or cpu"
            ))),
        }
    }
}

/// Which backend a model runs on, as chosen by `use_device`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReport {
    /// `"cpu"` or `"gpu"`.
    pub kind: String,
    /// The GPU adapter's name, on the GPU.
    pub name: Option<String>,
    /// The graphics API under it (Vulkan, Metal, Dx12, BrowserWebGpu), on the GPU.
    pub backend: Option<String>,
    /// A software adapter (lavapipe, SwiftShader).
    pub software: bool,
    /// Why `auto` chose the CPU, when it did.
    pub notice: Option<String>,
}

impl DeviceReport {
    /// The CPU, with an optional reason.
    pub fn cpu(notice: Option<String>) -> DeviceReport {
        DeviceReport {
            kind: "cpu".into(),
            notice,
            ..Default::default()
        }
    }
}
