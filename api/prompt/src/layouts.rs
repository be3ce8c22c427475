//! The layout registry: the store sees only layout fingerprints; everything that interprets a
//! chunk's bytes (retrieval, budgets, the store's codecs) looks its layout up here.

use std::collections::HashMap;

use kvtier_cache::ModelLayout;

/// The layouts every kvtier knows, by the names the CLI accepts.
pub fn builtin_layouts() -> [(&'static str, ModelLayout); 2] {
    [
        ("llama-3.1-8b", ModelLayout::llama31_8b()),
        ("smollm2-135m", ModelLayout::smollm2_135m()),
    ]
}

/// Layouts the service knows by fingerprint (the store itself only sees fingerprints).
#[derive(Debug, Clone, Default)]
pub struct Layouts(HashMap<u64, ModelLayout>);

impl Layouts {
    pub fn new(layouts: impl IntoIterator<Item = ModelLayout>) -> Self {
        Layouts(layouts.into_iter().map(|l| (l.fingerprint(), l)).collect())
    }

    pub fn get(&self, fingerprint: u64) -> Option<&ModelLayout> {
        self.0.get(&fingerprint)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModelLayout> {
        self.0.values()
    }
}
