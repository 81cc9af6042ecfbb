//! Keycloak: the client's secret set through the admin REST API
//! (keycloak.org, "Admin REST API", ClientRepresentation): `PUT
//! {base}/admin/realms/{realm}/clients/{id}` with `{"secret": "…"}`
//! updates the client, replacing its secret at once (`204`). The token is
//! the client's own, when its service account holds the realm-management
//! role `manage-clients`, or an administrative credential's
//! (`secret_api_credential`).
//!
//! Keycloak also regenerates secrets itself (`POST …/client-secret`) and,
//! with a realm's client-secret-rotation policy, keeps the previous one
//! valid as the "rotated" secret for a while. rekeyd takes the client
//! update in every realm configuration: its value is stored in the journal
//! before the call, so a lost reply loses nothing; a regenerated value
//! lost with its reply would lock the client out wherever no rotation
//! policy keeps the previous one ([`super::replace`]). A "rotated" secret
//! the policy keeps, rekeyd leaves to expire on the policy's clock.
//!
//! A wrong secret at the token endpoint is `401 {"error":
//! "invalid_client"}`; admin API errors carry `errorMessage` or `error`.

use reqwest::Method;
use url::Url;

use super::http::Transport;
pub use super::replace::CAPABILITIES;
use super::replace::ReplaceSecret;

/// The secret API of the client at `url` (`…/admin/realms/{realm}/clients/{id}`).
pub fn secret_api(transport: Transport, url: Url) -> ReplaceSecret {
    ReplaceSecret {
        transport,
        url,
        method: Method::PUT,
        field: "secret",
        operation: "keycloak set client secret",
    }
}
