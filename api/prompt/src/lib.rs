//! `kvtier-prompt`: what kvtier does with a stored prompt as a whole, below the server's
//! adapters (wire, HTTP, CLI) and above the store.
//!
//! - [`layouts`]: the layout registry (fingerprint → [`kvtier_cache::ModelLayout`]);
//! - [`read`]: a prompt's chunk chain walked by parent links ([`chain`]) and read back raw
//!   ([`read_prompt`]): what retrieval, budgets and the squeezer all start from;
//! - [`retrieval`]: RETRIEVE and the lifecycle of the background-built indexes;
//! - [`budget`]: layer budgets applied to a stored prompt (lossy tenants only);
//! - [`squeeze`]: the squeezer that applies budgets under host-memory pressure;
//! - [`periodic`]: the background threads both use.
//!
//! Errors are [`PromptError`]. Nothing here knows about HTTP, the wire or an async runtime:
//! every operation is synchronous and may block on disk reads, so async callers run it on a
//! blocking thread.

pub mod budget;
pub mod error;
pub mod layouts;
pub mod periodic;
pub mod read;
pub mod retrieval;
pub mod squeeze;

pub use error::{PromptError, Result};
pub use layouts::{Layouts, builtin_layouts};
pub use periodic::spawn_periodic;
pub use read::{MAX_PROMPT_CHUNKS, StoredChunk, StoredPrompt, chain, read_prompt};
