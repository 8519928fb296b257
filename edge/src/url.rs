//! The one MQTT broker URL parser of Hearth (hub, agent, actuator, tests).
//!
//! ```text
//! mqtt://[user[:password]@]host[:port][/]      plain TCP, port 1883 by default
//! tcp://…                                      the same
//! mqtts://[user[:password]@]host[:port][/]     TLS, port 8883 by default
//! ```
//!
//! Rules: the scheme is case-insensitive; `host` is a name, an IPv4 address or an IPv6
//! address in brackets (`[::1]:1883`); the port is 1–65535; a trailing `/` is allowed, any
//! other path, query or fragment is refused. The user information ends at the *last* `@`
//! and the user name at the *first* `:`, so a password may contain `:` and `@`; both are
//! percent-decoded (`%40` is `@`, `%3A` is `:`, `%25` is `%`), so any character can be
//! written. An empty user name is refused. Errors and [`std::fmt::Display`] never show the
//! password.

use std::fmt;

use crate::Error;

/// Default port of `mqtt://` and `tcp://`.
pub const DEFAULT_PORT: u16 = 1883;
/// Default port of `mqtts://`.
pub const DEFAULT_TLS_PORT: u16 = 8883;

/// A parsed broker URL.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttUrl {
    /// `mqtts://`: the connection uses TLS.
    pub tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// User name from the URL, percent-decoded.
    pub username: Option<String>,
    /// Password from the URL, percent-decoded.
    pub password: Option<String>,
}

impl fmt::Debug for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttUrl")
            .field("tls", &self.tls)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

/// `scheme://host:port`, with the user name but never the password.
impl fmt::Display for MqttUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme())?;
        if let Some(u) = &self.username {
            write!(f, "{}@", encode(u))?;
        }
        write!(f, "{}", self.host_port())
    }
}

/// Characters escaped when a user name is written back into a URL.
const USERINFO: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'%')
    .add(b'@')
    .add(b':')
    .add(b'/')
    .add(b'?')
    .add(b'#')
    .add(b'[')
    .add(b']');

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, USERINFO).to_string()
}

/// `url` with the password (if any) replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, hostport)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{hostport}"),
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

impl MqttUrl {
    /// Parses a broker URL by the rules of this module.
    pub fn parse(url: &str) -> Result<MqttUrl, Error> {
        let bad = |reason: &str| Error::Url {
            url: redact(url),
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected mqtt://, tcp:// or mqtts://host[:port]"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "mqtt" | "tcp" => false,
            "mqtts" => true,
            _ => return Err(bad("the scheme must be mqtt://, tcp:// or mqtts://")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        if hostport.contains(['/', '?', '#']) {
            return Err(bad(
                "a path, query or fragment is not allowed (only scheme://[user[:password]@]host[:port])",
            ));
        }
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (name, pass) = match u.split_once(':') {
                    Some((n, p)) => (n, Some(p)),
                    None => (u, None),
                };
                if name.is_empty() {
                    return Err(bad("empty user name before `@`"));
                }
                let dec = |s: &str, what: &str| {
                    percent_encoding::percent_decode_str(s)
                        .decode_utf8()
                        .map(|c| c.into_owned())
                        .map_err(|_| bad(&format!("the {what} is not UTF-8 once percent-decoded")))
                };
                (
                    Some(dec(name, "user name")?),
                    pass.map(|p| dec(p, "password")).transpose()?,
                )
            }
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("brackets must hold an IPv6 address"));
            }
            let port = match after {
                "" => None,
                a => Some(
                    a.strip_prefix(':')
                        .ok_or_else(|| bad("unexpected characters after `]`"))?,
                ),
            };
            (h.to_string(), port)
        } else {
            match hostport.split_once(':') {
                Some((h, p)) => {
                    if p.contains(':') {
                        return Err(bad(
                            "an IPv6 address must be written in brackets: [::1]:1883",
                        ));
                    }
                    (h.to_string(), Some(p))
                }
                None => (hostport.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '[' | ']' | '%' | '\\'))
        {
            return Err(bad("invalid character in the host"));
        }
        let port = match port {
            None if tls => DEFAULT_TLS_PORT,
            None => DEFAULT_PORT,
            Some(p) => Some(p)
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse::<u16>().ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(&format!("invalid port `{p}` (1-65535)")))?,
        };
        Ok(MqttUrl {
            tls,
            host,
            port,
            username,
            password,
        })
    }

    /// `mqtts` or `mqtt`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "mqtts"
        } else {
            "mqtt"
        }
    }

    /// `host:port`, IPv6 hosts in brackets.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL *with* its password (percent-encoded), for handing to a client that parses
    /// it back; never for a log or a message (use [`std::fmt::Display`] there).
    pub fn to_url_with_password(&self) -> String {
        match (&self.username, &self.password) {
            (Some(u), Some(p)) => format!(
                "{}://{}:{}@{}",
                self.scheme(),
                encode(u),
                encode(p),
                self.host_port()
            ),
            _ => self.to_string(),
        }
    }

    /// Combines the URL's credentials with separately configured ones by Hearth's one rule:
    /// **credentials come from the URL or from the separate fields, never from both**
    /// (giving both is a configuration error, so there is no silent precedence), and a
    /// password needs a user name.
    pub fn with_credentials(
        mut self,
        username: Option<String>,
        password: Option<String>,
    ) -> Result<MqttUrl, Error> {
        if username.is_none() && password.is_none() {
            return Ok(self);
        }
        if self.username.is_some() {
            return Err(Error::Settings(format!(
                "broker credentials are given both in the URL ({self}) and as username/password: \
                 use one or the other"
            )));
        }
        if username.is_none() {
            return Err(Error::Settings(
                "a broker password is set without a username".into(),
            ));
        }
        self.username = username;
        self.password = password;
        Ok(self)
    }
}

impl std::str::FromStr for MqttUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        MqttUrl::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> MqttUrl {
        MqttUrl::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn schemes_and_default_ports() {
        let u = p("mqtt://hub.local");
        assert_eq!((u.tls, u.host.as_str(), u.port), (false, "hub.local", 1883));
        assert_eq!(p("tcp://h").port, 1883);
        let u = p("mqtts://broker.lan");
        assert_eq!((u.tls, u.port), (true, 8883));
        assert_eq!(p("MQTTS://h").port, 8883);
        assert_eq!(p("mqtts://h:9999").port, 9999);
        assert_eq!(p("mqtt://127.0.0.1:1884/").port, 1884);
        for bad in ["http://h:1", "ws://h", "h:1883", "mqtt:/h", "mqtts//h"] {
            let e = MqttUrl::parse(bad).unwrap_err();
            assert!(e.is_config(), "{bad}");
        }
    }

    #[test]
    fn ports_are_checked() {
        for bad in [
            "mqtt://h:0",
            "mqtt://h:65536",
            "mqtt://h:",
            "mqtt://h:+1",
            "mqtt://h:1a",
            "mqtt://h:-1",
        ] {
            assert!(MqttUrl::parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(p("mqtt://h:65535").port, 65535);
    }

    #[test]
    fn ipv6_in_brackets() {
        let u = p("tcp://[::1]:1999");
        assert_eq!((u.host.as_str(), u.port), ("::1", 1999));
        assert_eq!(u.host_port(), "[::1]:1999");
        assert_eq!(p("mqtts://[fe80::1]").port, 8883);
        for bad in [
            "mqtt://::1:1883",
            "mqtt://[::1",
            "mqtt://[::1]x",
            "mqtt://[nope]:1",
        ] {
            assert!(MqttUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn credentials_and_percent_decoding() {
        let u = p("mqtt://agent:s3cret@hub:1883/");
        assert_eq!(u.username.as_deref(), Some("agent"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        let u = p("mqtt://agent@hub");
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref()),
            (Some("agent"), None)
        );
        // `:` and `@` in a password: raw (last `@`, first `:`) or percent-encoded.
        let u = p("mqtts://hub:pa:ss@w@rd@[::1]:8884");
        assert_eq!(u.username.as_deref(), Some("hub"));
        assert_eq!(u.password.as_deref(), Some("pa:ss@w@rd"));
        assert_eq!(u.host, "::1");
        let u = p("mqtt://us%3Aer%40home:p%40%3A%25x@h");
        assert_eq!(u.username.as_deref(), Some("us:er@home"));
        assert_eq!(u.password.as_deref(), Some("p@:%x"));
        let u = p("mqtt://u:@h");
        assert_eq!(u.password.as_deref(), Some(""));
        for bad in ["mqtt://@h", "mqtt://:pw@h", "mqtt://u:%FF@h", "mqtt://u:p@"] {
            assert!(MqttUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn paths_and_junk_are_refused() {
        for bad in [
            "mqtt://h/topic",
            "mqtt://h?x=1",
            "mqtt://h#f",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://h o:1",
            "mqtt://u:p@h/x",
        ] {
            assert!(MqttUrl::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn url_with_password_parses_back() {
        let u = MqttUrl::parse("mqtt://k%40x:p%3Aw%40d@[::1]:1999").unwrap();
        let back = MqttUrl::parse(&u.to_url_with_password()).unwrap();
        assert_eq!(back, u);
        assert_eq!(back.password.as_deref(), Some("p:w@d"));
    }

    #[test]
    fn passwords_never_show() {
        let u = p("mqtt://agent:hunter2@hub:1");
        assert_eq!(u.to_string(), "mqtt://agent@hub:1");
        assert!(!format!("{u:?}").contains("hunter2"));
        let e = MqttUrl::parse("mqtt://agent:hunter2@hub:0")
            .unwrap_err()
            .to_string();
        assert!(
            !e.contains("hunter2") && e.contains("agent:***@hub:0"),
            "{e}"
        );
        assert_eq!(p("mqtt://a%40b@h").to_string(), "mqtt://a%40b@h:1883");
    }

    #[test]
    fn credentials_come_from_one_place() {
        let plain = p("mqtt://h");
        let u = plain
            .clone()
            .with_credentials(Some("hub".into()), Some("pw".into()))
            .unwrap();
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref()),
            (Some("hub"), Some("pw"))
        );
        assert_eq!(plain.clone().with_credentials(None, None).unwrap(), plain);
        let e = p("mqtt://a:b@h")
            .with_credentials(Some("hub".into()), None)
            .unwrap_err();
        assert!(e.is_config() && e.to_string().contains("both"), "{e}");
        let e = plain.with_credentials(None, Some("pw".into())).unwrap_err();
        assert!(e.to_string().contains("without a username"), "{e}");
        // URL credentials alone stay.
        let u = p("mqtt://a:b@h").with_credentials(None, None).unwrap();
        assert_eq!(u.password.as_deref(), Some("b"));
    }
}
