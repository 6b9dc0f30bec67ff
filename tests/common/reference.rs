//! The SmolLM2 reference numbers (../shared/reference/smollm2_135m_q4_1.json): cases by name, token ids.

/// The reference file.
pub const REFERENCE: &str = include_str!("../../../shared/reference/smollm2_135m_q4_1.json");

/// Every case, in file order.
pub fn cases() -> Vec<serde_json::Value> {
    let r: serde_json::Value = serde_json::from_str(REFERENCE).unwrap();
    r["results"].as_array().unwrap().clone()
}

/// The case called `name`.
pub fn case(name: &str) -> serde_json::Value {
    cases().into_iter().find(|c| c["case"] == name).unwrap()
}

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
