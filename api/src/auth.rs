//! Authentication and tenant resolution, shared by both planes.
//!
//! A configured token guards everything. Tenant tokens additionally pin the caller to one tenant
//! so that a client cannot claim another tenant's name. Token comparison is constant-time.

use std::collections::BTreeMap;

use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Tenant used when a caller names none.
pub const DEFAULT_TENANT: &str = "default";
/// Longest tenant name accepted.
pub const MAX_TENANT_LEN: usize = 128;

/// Who a request is from, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant: String,
}

/// The configured credentials.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    token: Option<String>,
    tenant_tokens: Vec<(String, String)>,
}

fn ct_eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

impl Auth {
    pub fn new(token: Option<String>, tenant_tokens: &BTreeMap<String, String>) -> Self {
        Auth {
            token,
            tenant_tokens: tenant_tokens
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    /// Whether any credential is configured.
    pub fn enabled(&self) -> bool {
        self.token.is_some() || !self.tenant_tokens.is_empty()
    }

    /// Checks a presented token and resolves the tenant the caller acts as. `requested` is the
    /// tenant the caller names (header or hello frame); a tenant token overrides it and refuses
    /// a mismatch.
    pub fn authorize(
        &self,
        presented: Option<&str>,
        requested: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let requested = requested.filter(|t| !t.is_empty());
        if let Some(t) = requested {
            validate_tenant(t)?;
        }
        if !self.enabled() {
            return Ok(Principal {
                tenant: requested.unwrap_or(DEFAULT_TENANT).to_string(),
            });
        }
        let Some(presented) = presented else {
            return Err(ApiError::Unauthorized("missing token".into()));
        };
        // Check every candidate so the time taken does not reveal which one matched.
        let mut pinned: Option<&str> = None;
        for (tok, tenant) in &self.tenant_tokens {
            if ct_eq(tok, presented) {
                pinned = Some(tenant);
            }
        }
        let global = self.token.as_deref().is_some_and(|t| ct_eq(t, presented));
        match (pinned, global) {
            (Some(tenant), _) => match requested {
                Some(r) if r != tenant => Err(ApiError::Unauthorized(format!(
                    "token is not valid for tenant {r:?}"
                ))),
                _ => Ok(Principal {
                    tenant: tenant.to_string(),
                }),
            },
            (None, true) => Ok(Principal {
                tenant: requested.unwrap_or(DEFAULT_TENANT).to_string(),
            }),
            (None, false) => Err(ApiError::Unauthorized("invalid token".into())),
        }
    }
}

/// Tenant names are short printable identifiers.
pub fn validate_tenant(t: &str) -> Result<(), ApiError> {
    if t.is_empty() || t.len() > MAX_TENANT_LEN || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::BadRequest(format!(
            "invalid tenant name (1..={MAX_TENANT_LEN} printable ASCII characters)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_when_unconfigured() {
        let a = Auth::default();
        assert_eq!(a.authorize(None, None).unwrap().tenant, DEFAULT_TENANT);
        assert_eq!(a.authorize(None, Some("x")).unwrap().tenant, "x");
    }

    #[test]
    fn global_token_required_and_checked() {
        let a = Auth::new(Some("secret-token".into()), &BTreeMap::new());
        assert!(matches!(
            a.authorize(None, None),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            a.authorize(Some("secret-tokeX"), None),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            a.authorize(Some("secret"), None),
            Err(ApiError::Unauthorized(_))
        ));
        assert_eq!(
            a.authorize(Some("secret-token"), Some("bob"))
                .unwrap()
                .tenant,
            "bob"
        );
    }

    #[test]
    fn tenant_tokens_pin_the_tenant() {
        let mut m = BTreeMap::new();
        m.insert("alice-token".to_string(), "alice".to_string());
        let a = Auth::new(None, &m);
        assert_eq!(
            a.authorize(Some("alice-token"), None).unwrap().tenant,
            "alice"
        );
        assert_eq!(
            a.authorize(Some("alice-token"), Some("alice"))
                .unwrap()
                .tenant,
            "alice"
        );
        assert!(matches!(
            a.authorize(Some("alice-token"), Some("bob")),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(a.authorize(None, Some("alice")).is_err());
    }

    #[test]
    fn bad_tenant_names_are_refused() {
        assert!(validate_tenant("").is_err());
        assert!(validate_tenant("a b").is_err());
        assert!(validate_tenant(&"x".repeat(200)).is_err());
        assert!(validate_tenant("team-7").is_ok());
    }
}
