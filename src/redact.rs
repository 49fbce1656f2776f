//! Keeps credentials out of logs, `Debug` output and error messages.

use std::fmt;

use url::Url;

/// Shows a URL without its password, user name, query values, or query keys that may be
/// a token themselves (see [`looks_like_a_name`]).
pub(crate) struct RedactedUrl<'a>(pub &'a Url);

impl fmt::Display for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = self.0;
        write!(f, "{}://", u.scheme())?;
        if !u.username().is_empty() || u.password().is_some() {
            f.write_str("<redacted>@")?;
        }
        f.write_str(u.host_str().unwrap_or(""))?;
        if let Some(p) = u.port() {
            write!(f, ":{p}")?;
        }
        f.write_str(u.path())?;
        if u.query().is_some() {
            let mut first = true;
            for (k, v) in u.query_pairs() {
                f.write_str(if first { "?" } else { "&" })?;
                first = false;
                if v.is_empty() || !looks_like_a_name(&k) {
                    // A bare key (`?<token>`), or one that is no parameter name (a padded
                    // base64 token, `?<token>==`, parses as key and value "="), may be
                    // the credential itself.
                    f.write_str("<redacted>")?;
                } else {
                    write!(f, "{k}=<redacted>")?;
                }
            }
        }
        Ok(())
    }
}

/// Longest query key shown: a longer one may be a token rather than a parameter name.
const SHOWN_QUERY_KEY_MAX: usize = 24;

/// Whether a query key reads as a parameter name (`access_token`, `X-Amz-Signature`),
/// shown with its value redacted; anything else is hidden whole.
fn looks_like_a_name(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= SHOWN_QUERY_KEY_MAX
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.[]".contains(&b))
}

impl RedactedUrl<'_> {
    /// For a string that did not parse: drop anything that may hold a secret. Such a
    /// string's user info may contain `/`, `?` or `#` unescaped, so everything up to its
    /// last `@` goes first, then the query and fragment; a scheme that is not one (it
    /// holds other characters than a scheme may) is not shown either.
    pub(crate) fn raw(s: &str) -> String {
        let (scheme, rest) = match s.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, s),
        };
        let (userinfo, rest) = match rest.rfind('@') {
            Some(at) => ("<redacted>@", &rest[at + 1..]),
            None => ("", rest),
        };
        let no_query = rest.split(['?', '#']).next().unwrap_or("");
        match scheme {
            Some(scheme) => {
                let scheme = if !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                {
                    scheme
                } else {
                    "<redacted>"
                };
                let (host, path) = no_query.split_once('/').unwrap_or((no_query, ""));
                format!("{scheme}://{userinfo}{host}/{path}")
            }
            None => {
                let shown: String = no_query.chars().take(64).collect();
                format!("{userinfo}{shown}")
            }
        }
    }
}

/// Header names whose values are credentials.
pub(crate) fn is_secret_header(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "authorization"
        || n == "proxy-authorization"
        || n == "cookie"
        || n.contains("token")
        || n.contains("secret")
        || n.contains("key")
        || n.contains("auth")
        || n.contains("password")
}

/// Longest subprotocol name shown in `Debug` output (and offered to another origin after
/// a redirect): a longer one may be an opaque credential.
const SHOWN_SUBPROTOCOL_MAX: usize = 40;

/// A subprotocol name for `Debug` output: `<redacted>` when it may carry a credential.
/// Some servers take one as a subprotocol (Kubernetes:
/// `base64url.bearer.authorization.k8s.io.<token>`), so a name with a credential's word
/// in it (as for headers, or `bearer`) or longer than 40 bytes is not shown.
pub(crate) fn shown_subprotocol(name: &str) -> &str {
    if is_secret_subprotocol(name) {
        "<redacted>"
    } else {
        name
    }
}

/// Whether a subprotocol name may carry a credential (see [`shown_subprotocol`]): not
/// shown, and not offered to another origin after a redirect.
pub(crate) fn is_secret_subprotocol(name: &str) -> bool {
    name.len() > SHOWN_SUBPROTOCOL_MAX
        || is_secret_header(name)
        || name.to_ascii_lowercase().contains("bearer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_secrets_are_hidden() {
        let u = Url::parse("wss://bob:hunter2@example.com:8443/feed?token=abc&x=1").unwrap();
        let s = RedactedUrl(&u).to_string();
        assert_eq!(
            s,
            "wss://<redacted>@example.com:8443/feed?token=<redacted>&x=<redacted>"
        );
        let r = RedactedUrl::raw("ws://bob:hunter2@exa mple.com/x?token=abc");
        assert!(!r.contains("hunter2") && !r.contains("abc"), "{r}");
        // A token passed as a bare query key (`?<token>`, no `=`) is one too.
        let u = Url::parse("ws://example.com/feed?eyJhbGciOiJIUzI1NiJ9SECRET&x=1").unwrap();
        assert_eq!(
            RedactedUrl(&u).to_string(),
            "ws://example.com/feed?<redacted>&x=<redacted>"
        );
        // A padded base64 token parses as key `<token>` and value `=`.
        let u = Url::parse("ws://example.com/feed?c2VjcmV0LXRva2VuLTEyMzQ1Njc4OQ==").unwrap();
        assert_eq!(
            RedactedUrl(&u).to_string(),
            "ws://example.com/feed?<redacted>"
        );
        // Parameter names stay readable.
        let u = Url::parse("ws://example.com/?X-Amz-Signature=ab&access_token=cd").unwrap();
        assert_eq!(
            RedactedUrl(&u).to_string(),
            "ws://example.com/?X-Amz-Signature=<redacted>&access_token=<redacted>"
        );
    }

    #[test]
    fn unparsed_url_secrets_are_hidden_whatever_the_password_holds() {
        for url in [
            "ws://bob:hunter/2@example.com/feed",
            "ws://bob:hun?ter2@example.com/feed",
            "ws://bob:hun#ter2@example.com/feed",
            "ws://bob:hun@ter2@example.com:99999/feed",
            "bob:hunter2@example.com/feed",
            "bob:hunter2@x://example.com/feed",
        ] {
            let r = RedactedUrl::raw(url);
            assert!(!r.contains("hun") && !r.contains("bob"), "{url} -> {r}");
            assert!(r.contains("example.com"), "{url} -> {r}");
        }
        assert_eq!(
            RedactedUrl::raw("ws://exa mple.com/feed?token=abc#frag"),
            "ws://exa mple.com/feed"
        );
    }

    #[test]
    fn secret_headers() {
        assert!(is_secret_header("Authorization"));
        assert!(is_secret_header("X-Api-Key"));
        assert!(!is_secret_header("User-Agent"));
    }

    #[test]
    fn subprotocols_that_may_carry_credentials_are_hidden() {
        assert_eq!(shown_subprotocol("v1.json"), "v1.json");
        assert_eq!(
            shown_subprotocol("graphql-transport-ws"),
            "graphql-transport-ws"
        );
        for secret in [
            "base64url.bearer.authorization.k8s.io.dG9rZW4",
            "Bearer.x",
            "access_token.abc",
            "apikey-123",
            "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0",
        ] {
            assert_eq!(shown_subprotocol(secret), "<redacted>", "{secret}");
        }
    }
}
