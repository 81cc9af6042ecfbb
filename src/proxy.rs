//! Which proxy, if any, each HTTP request of rekeyd goes through.
//!
//! The rule, for every HTTP client rekeyd builds (providers' token and
//! secret APIs, the Kubernetes store and Secret sinks):
//!
//! - **Plain `http://` never goes through a proxy.** rekeyd accepts plain
//!   http only to loopback (or with `endpoints.allow_insecure_http`), and
//!   such a request carries a client secret or a bearer token in the clear:
//!   a proxy would read it. So `HTTP_PROXY` is never used.
//! - **Loopback destinations are reached directly** (`localhost`,
//!   `127.0.0.0/8`, `::1`): they are on this machine, which a proxy is not.
//! - **`https://` follows the environment as curl and reqwest read it**
//!   (hyper-util's matcher, which reqwest uses): `HTTPS_PROXY` (or
//!   `https_proxy`), else `ALL_PROXY` (`all_proxy`); hosts matching
//!   `NO_PROXY` (`no_proxy`: comma-separated domains, which match their
//!   subdomains too, IP addresses, CIDR ranges, or `*`) are reached
//!   directly. Through a proxy the request is a `CONNECT` tunnel: the proxy
//!   sees the host name, never the secret.
//!
//! Only `http://` and `https://` proxies are supported (reqwest is built
//! without SOCKS); a proxy variable with another scheme is ignored, and
//! `rekeyd check` says so. The etcd store's gRPC client never uses a proxy.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use hyper_util::client::proxy::matcher::Matcher;
use url::Url;

/// The proxy settings of the environment, read once.
pub struct ProxyEnv {
    /// The proxy for https requests, if a variable names a usable one.
    proxy: Option<EnvProxy>,
    /// Decides, for an https URL, whether `NO_PROXY` exempts it.
    matcher: Matcher,
    /// Proxy variables that are set but not used, with the reason.
    ignored: Vec<String>,
}

/// A proxy named by an environment variable. Its URL may carry credentials:
/// `Display` and `Debug` leave them out (I7).
#[derive(Clone)]
pub struct EnvProxy {
    url: Url,
    /// The variable it came from (`HTTPS_PROXY`, `all_proxy`, ...).
    pub variable: &'static str,
}

/// Why a request goes directly to its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direct {
    /// `http://`: never through a proxy.
    PlainHttp,
    /// A loopback host.
    Loopback,
    /// `NO_PROXY` names the host.
    NoProxy,
    /// No usable `HTTPS_PROXY` or `ALL_PROXY`.
    NoneSet,
}

/// How a request to one URL travels.
#[derive(Clone, Debug)]
pub enum Route {
    Direct(Direct),
    Proxy(EnvProxy),
}

impl ProxyEnv {
    /// Reads the process's environment.
    pub fn from_env() -> ProxyEnv {
        ProxyEnv::from_vars(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `var` (tests pass a map). As curl and
    /// hyper-util do, of each upper/lower-case pair the first that is set
    /// counts, even if empty.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> ProxyEnv {
        let first = |names: [&'static str; 2]| {
            names
                .into_iter()
                .find_map(|name| var(name).map(|value| (name, value)))
        };
        let mut ignored = Vec::new();
        if let Some((name, _)) = first(["HTTP_PROXY", "http_proxy"]) {
            ignored.push(format!("{name}: plain http never uses a proxy"));
        }
        let mut proxy = None;
        for (name, value) in [
            first(["HTTPS_PROXY", "https_proxy"]),
            first(["ALL_PROXY", "all_proxy"]),
        ]
        .into_iter()
        .flatten()
        {
            if value.trim().is_empty() {
                continue;
            }
            match (&proxy, parse_proxy(&value)) {
                (None, Ok(url)) => {
                    proxy = Some(EnvProxy {
                        url,
                        variable: name,
                    })
                }
                (Some(_), Ok(_)) => ignored.push(format!(
                    "{name}: HTTPS_PROXY takes precedence for https requests"
                )),
                (_, Err(reason)) => ignored.push(format!("{name}: {reason}")),
            }
        }
        let no_proxy = first(["NO_PROXY", "no_proxy"])
            .map(|(_, value)| value)
            .unwrap_or_default();
        let matcher = Matcher::builder()
            .https(
                proxy
                    .as_ref()
                    .map(|p| p.url.to_string())
                    .unwrap_or_default(),
            )
            .no(no_proxy)
            .build();
        ProxyEnv {
            proxy,
            matcher,
            ignored,
        }
    }

    /// How a request to `url` travels (see the module documentation).
    pub fn route(&self, url: &Url) -> Route {
        if url.scheme() != "https" {
            return Route::Direct(Direct::PlainHttp);
        }
        if is_loopback(url) {
            return Route::Direct(Direct::Loopback);
        }
        let Some(proxy) = &self.proxy else {
            return Route::Direct(Direct::NoneSet);
        };
        let exempt = url
            .as_str()
            .parse::<http::Uri>()
            .map_or(true, |uri| self.matcher.intercept(&uri).is_none());
        if exempt {
            Route::Direct(Direct::NoProxy)
        } else {
            Route::Proxy(proxy.clone())
        }
    }

    /// Like [`ProxyEnv::route`], for a client whose own configuration may
    /// name a proxy (`configured`, from `source`, such as a kubeconfig's
    /// `proxy-url`): that one wins over the environment for https; plain
    /// http still never uses a proxy.
    pub fn route_configured(
        &self,
        url: &Url,
        configured: Option<&str>,
        source: &'static str,
    ) -> Result<Route, String> {
        match configured.filter(|c| !c.trim().is_empty()) {
            Some(_) if url.scheme() != "https" => Ok(Route::Direct(Direct::PlainHttp)),
            Some(proxy) => Ok(Route::Proxy(EnvProxy {
                url: parse_proxy(proxy).map_err(|e| format!("{source}: {e}"))?,
                variable: source,
            })),
            None => Ok(self.route(url)),
        }
    }

    /// Proxy variables that are set but play no part, each with the reason
    /// (for `rekeyd check`).
    pub fn ignored(&self) -> &[String] {
        &self.ignored
    }

    /// The reqwest proxy that applies [`ProxyEnv::route`] to every request
    /// of a client; `None` when no request would use one.
    pub fn reqwest_proxy(self: &Arc<Self>) -> Option<reqwest::Proxy> {
        self.proxy.as_ref()?;
        let env = self.clone();
        Some(reqwest::Proxy::custom(move |url| match env.route(url) {
            // With its credentials: reqwest sends them to the proxy in
            // Proxy-Authorization, never to the destination.
            Route::Proxy(proxy) => Some(proxy.url),
            Route::Direct(_) => None,
        }))
    }
}

impl Route {
    /// For `rekeyd check`: `direct (plain http never uses a proxy)`,
    /// `via http://proxy:3128 (HTTPS_PROXY)`, ...
    pub fn describe(&self) -> String {
        match self {
            Route::Proxy(p) => format!("via {p} ({})", p.variable),
            Route::Direct(why) => format!(
                "direct ({})",
                match why {
                    Direct::PlainHttp => "plain http never uses a proxy",
                    Direct::Loopback => "loopback",
                    Direct::NoProxy => "NO_PROXY",
                    Direct::NoneSet => "no HTTPS_PROXY or ALL_PROXY set",
                }
            ),
        }
    }
}

impl EnvProxy {
    /// The proxy's URL with its credentials, for clients that take an
    /// `http::Uri` (and send the credentials to the proxy only). Never to
    /// be shown: `Display` this instead.
    pub fn uri(&self) -> Option<http::Uri> {
        self.url.as_str().parse().ok()
    }

    /// Whether the proxy URL carries credentials.
    pub fn has_credentials(&self) -> bool {
        !self.url.username().is_empty() || self.url.password().is_some()
    }
}

/// `scheme://host:port`, with `[redacted]@` in place of any credentials.
impl fmt::Display for EnvProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let credentials = if self.has_credentials() {
            "[redacted]@"
        } else {
            ""
        };
        write!(
            f,
            "{}://{credentials}{}",
            self.url.scheme(),
            self.url.host_str().unwrap_or("")
        )?;
        if let Some(port) = self.url.port_or_known_default() {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for EnvProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EnvProxy({self}, {})", self.variable)
    }
}

/// A proxy variable's value as a URL; without a scheme it means `http://`
/// (as curl reads it).
fn parse_proxy(value: &str) -> Result<Url, String> {
    let value = value.trim();
    let text = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    // The URL parser's errors never quote the input, which may hold a
    // password.
    let url = Url::parse(&text).map_err(|e| format!("not a proxy URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{}:// proxies are not supported (only http:// and https://)",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("proxy URL without a host".into());
    }
    Ok(url)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> ProxyEnv {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ProxyEnv::from_vars(|name| vars.get(name).cloned())
    }

    fn route(env: &ProxyEnv, url: &str) -> String {
        env.route(&Url::parse(url).unwrap()).describe()
    }

    #[test]
    fn plain_http_never_uses_a_proxy() {
        let e = env(&[
            ("HTTP_PROXY", "http://proxy.example:3128"),
            ("HTTPS_PROXY", "http://proxy.example:3128"),
            ("ALL_PROXY", "http://proxy.example:3128"),
        ]);
        for url in [
            "http://127.0.0.1:8080/connect/token",
            "http://auth.example.com/connect/token",
        ] {
            assert_eq!(route(&e, url), "direct (plain http never uses a proxy)");
        }
        assert_eq!(
            e.ignored(),
            [
                "HTTP_PROXY: plain http never uses a proxy",
                "ALL_PROXY: HTTPS_PROXY takes precedence for https requests"
            ]
        );
        // Only HTTP_PROXY set: nothing uses a proxy.
        let e = env(&[("HTTP_PROXY", "http://proxy.example:3128")]);
        assert_eq!(
            route(&e, "https://auth.example.com/"),
            "direct (no HTTPS_PROXY or ALL_PROXY set)"
        );
        assert!(e.reqwest_proxy_is_none());
    }

    #[test]
    fn https_follows_https_proxy_then_all_proxy_except_no_proxy() {
        let e = env(&[
            ("https_proxy", "proxy.example:3128"),
            ("NO_PROXY", "internal.example.net, 10.0.0.0/8"),
        ]);
        assert_eq!(
            route(&e, "https://auth.example.com/connect/token"),
            "via http://proxy.example:3128 (https_proxy)"
        );
        assert_eq!(
            route(&e, "https://login.internal.example.net/token"),
            "direct (NO_PROXY)"
        );
        assert_eq!(
            route(&e, "https://10.1.2.3:8443/token"),
            "direct (NO_PROXY)"
        );
        assert_eq!(
            route(&e, "https://127.0.0.1:8443/token"),
            "direct (loopback)"
        );
        assert_eq!(route(&e, "https://[::1]:8443/token"), "direct (loopback)");
        assert_eq!(route(&e, "https://localhost/token"), "direct (loopback)");

        let e = env(&[("ALL_PROXY", "https://proxy.example")]);
        assert_eq!(
            route(&e, "https://auth.example.com/"),
            "via https://proxy.example:443 (ALL_PROXY)"
        );
        let e = env(&[("ALL_PROXY", "http://proxy.example:1"), ("no_proxy", "*")]);
        assert_eq!(route(&e, "https://auth.example.com/"), "direct (NO_PROXY)");
    }

    #[test]
    fn proxy_credentials_are_never_shown() {
        let e = env(&[("HTTPS_PROXY", "http://user:hunter2@proxy.example:3128")]);
        let shown = route(&e, "https://auth.example.com/");
        assert_eq!(
            shown,
            "via http://[redacted]@proxy.example:3128 (HTTPS_PROXY)"
        );
        let Route::Proxy(p) = e.route(&Url::parse("https://auth.example.com/").unwrap()) else {
            panic!("expected a proxy");
        };
        assert!(!format!("{p:?}").contains("hunter2"));
    }

    #[test]
    fn a_configured_proxy_wins_for_https_only() {
        let e = env(&[("HTTPS_PROXY", "http://env.example:3128")]);
        let url = |u: &str| Url::parse(u).unwrap();
        let kube = "kubeconfig proxy-url";
        let r = e
            .route_configured(
                &url("https://k8s.example:6443"),
                Some("http://kp.example:8080"),
                kube,
            )
            .unwrap();
        assert_eq!(
            r.describe(),
            "via http://kp.example:8080 (kubeconfig proxy-url)"
        );
        let r = e
            .route_configured(
                &url("http://127.0.0.1:8001"),
                Some("http://kp.example:8080"),
                kube,
            )
            .unwrap();
        assert_eq!(r.describe(), "direct (plain http never uses a proxy)");
        let r = e
            .route_configured(&url("https://k8s.example:6443"), None, kube)
            .unwrap();
        assert_eq!(r.describe(), "via http://env.example:3128 (HTTPS_PROXY)");
        let err = e
            .route_configured(&url("https://k8s.example:6443"), Some("socks5://x:1"), kube)
            .unwrap_err();
        assert!(err.starts_with("kubeconfig proxy-url: socks5://"), "{err}");
    }

    #[test]
    fn unusable_proxy_variables_are_reported_not_used() {
        let e = env(&[
            ("HTTPS_PROXY", "socks5://user:hunter2@proxy.example:1080"),
            ("ALL_PROXY", "http://fallback.example:3128"),
        ]);
        assert_eq!(
            route(&e, "https://auth.example.com/"),
            "via http://fallback.example:3128 (ALL_PROXY)"
        );
        assert_eq!(
            e.ignored(),
            ["HTTPS_PROXY: socks5:// proxies are not supported (only http:// and https://)"]
        );
        // An empty HTTPS_PROXY hides https_proxy, as in curl.
        let e = env(&[("HTTPS_PROXY", ""), ("https_proxy", "http://p.example:1")]);
        assert_eq!(
            route(&e, "https://auth.example.com/"),
            "direct (no HTTPS_PROXY or ALL_PROXY set)"
        );
    }

    impl ProxyEnv {
        fn reqwest_proxy_is_none(self) -> bool {
            Arc::new(self).reqwest_proxy().is_none()
        }
    }
}
