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

/// Let the JS event loop run (a macrotask turn), so the page can paint streamed tokens and deliver events (an
/// abort) during long work: `setImmediate` (Node), else a `MessageChannel` message (not clamped to 4 ms like a
/// nested `setTimeout`, and queued behind messages already waiting, so a worker sees an abort message), else
/// `setTimeout(0)`. Not `scheduler.yield()`: its continuation runs ahead of waiting tasks, so a worker busy
/// generating would never read the abort. Natively a no-op.
pub async fn yield_now() {
    #[cfg(target_arch = "wasm32")]
    {
        use wasm_bindgen::{JsCast, JsValue};
        let global = js_sys::global();
        let get =
            |o: &JsValue, k: &str| js_sys::Reflect::get(o, &k.into()).unwrap_or(JsValue::UNDEFINED);
        let promise = {
            js_sys::Promise::new(&mut |resolve, _| {
                // Node: setImmediate, unclamped and without keeping a port open.
                if let Some(si) = get(&global, "setImmediate").dyn_ref::<js_sys::Function>() {
                    if si.call1(&JsValue::NULL, &resolve).is_ok() {
                        return;
                    }
                }
                let channel = get(&global, "MessageChannel")
                    .dyn_into::<js_sys::Function>()
                    .ok()
                    .and_then(|c| js_sys::Reflect::construct(&c, &js_sys::Array::new()).ok());
                if let Some(ch) = channel {
                    let (p1, p2) = (get(&ch, "port1"), get(&ch, "port2"));
                    let port = p1.clone();
                    let resolve = resolve.clone();
                    // Close the channel once its message arrives, then resolve.
                    let on_message =
                        wasm_bindgen::closure::Closure::once_into_js(move |_: JsValue| {
                            if let Some(close) = get(&port, "close").dyn_ref::<js_sys::Function>() {
                                let _ = close.call0(&port);
                            }
                            let _ = resolve.call0(&JsValue::NULL);
                        });
                    let _ = js_sys::Reflect::set(&p1, &"onmessage".into(), &on_message);
                    if let Some(post) = get(&p2, "postMessage").dyn_ref::<js_sys::Function>() {
                        if post.call1(&p2, &JsValue::NULL).is_ok() {
                            return;
                        }
                    }
                }
                match get(&global, "setTimeout").dyn_ref::<js_sys::Function>() {
                    Some(st) => {
                        let _ = st.call2(&JsValue::NULL, &resolve, &JsValue::from(0));
                    }
                    None => {
                        let _ = resolve.call0(&JsValue::NULL);
                    }
                }
            })
        };
        let _ = wasm_bindgen_futures::JsFuture::from(promise).await;
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
    /// The matrix-vector products use subgroup operations (on the GPU, where the adapter offers them).
    pub subgroups: bool,
    /// Why `auto` chose the CPU, when it did.
    pub notice: Option<String>,
    /// On the GPU: command submissions since it was attached (a decoding step is one; greedy decoding runs
    /// several steps in one).
    pub submissions: u64,
    /// On the GPU: the host's time recording and submitting them, in microseconds (`Gpu::submit`: in a browser
    /// every launch is a call into the page's WebGPU). A request's difference, less a prompt-only request's, over
    /// the tokens it fed back: the host's share of a decoding step, which decoding cannot go below however fast
    /// the GPU (what `cargo bench --bench gpu` and bench/generate-browser.mjs print).
    pub submit_us: u64,
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
