//! Named caps, checked before allocating. Every cap is configurable; the defaults suit a browser tab.

/// Caps on untrusted input. `Limits::default()` is what the JS API and the CLI use unless told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Largest document accepted, in bytes (refused before any parsing).
    pub max_doc_bytes: usize,
    /// Most pages read from one PDF.
    pub max_pdf_pages: usize,
    /// Most bytes one PDF page's content streams (or a font's ToUnicode map) may inflate to.
    pub max_pdf_stream_bytes: usize,
    /// Largest model file accepted (and largest single tensor inside one), in bytes.
    pub max_model_bytes: usize,
    /// Most characters of extracted text per document (HTML and PDF can expand; text never does).
    pub max_text_bytes: usize,
    /// Largest knowledge pack (index snapshot) accepted, in bytes.
    pub max_pack_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_doc_bytes: 64 << 20,
            max_pdf_pages: 5_000,
            max_pdf_stream_bytes: 32 << 20,
            max_text_bytes: 64 << 20,
            max_model_bytes: 1 << 30,
            max_pack_bytes: 1 << 30,
        }
    }
}

impl Limits {
    /// `Err(ResourceLimit)` when `size > limit`.
    pub(crate) fn check(what: &'static str, size: usize, limit: usize) -> crate::Result<()> {
        if size > limit {
            return Err(crate::Error::ResourceLimit {
                what,
                size: size as u64,
                limit: limit as u64,
            });
        }
        Ok(())
    }
}
