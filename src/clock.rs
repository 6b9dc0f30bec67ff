//! A monotonic clock in milliseconds from an arbitrary origin, natively and in wasm (where `std::time::Instant`
//! panics): `performance.now()` where the global has it (browsers, Workers, Node, workerd), else `Date.now()`.

/// Milliseconds from an arbitrary origin.
pub fn now_ms() -> f64 {
    #[cfg(target_arch = "wasm32")]
    {
        use wasm_bindgen::JsCast;
        let perf = js_sys::Reflect::get(&js_sys::global(), &"performance".into()).ok();
        let now = perf
            .as_ref()
            .and_then(|p| js_sys::Reflect::get(p, &"now".into()).ok());
        match (
            perf,
            now.and_then(|f| f.dyn_into::<js_sys::Function>().ok()),
        ) {
            (Some(p), Some(f)) => f
                .call0(&p)
                .ok()
                .and_then(|v| v.as_f64())
                .unwrap_or_else(js_sys::Date::now),
            _ => js_sys::Date::now(),
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        use std::sync::OnceLock;
        static START: OnceLock<std::time::Instant> = OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs_f64()
            * 1000.0
    }
}
