//! The address of the PostgreSQL server behind the proxy.

use std::fmt;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// PostgreSQL's default port, used when a unix socket directory is given without one.
pub const DEFAULT_PG_PORT: u16 = 5432;

/// Where PostgreSQL listens. Written in the config as one string so it reads like a libpq host:
///
/// - `"host:port"` (host is a name, an IPv4 address, or `[IPv6]`) → [`Upstream::Tcp`];
///   the port is required.
/// - `"/abs/dir"` → [`Upstream::Unix`] on port 5432; `"/abs/dir:5433"` → port 5433. The socket
///   file is `dir/.s.PGSQL.<port>`, as with libpq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Upstream {
    /// A TCP endpoint. `host` holds IPv6 addresses without brackets.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// TCP port.
        port: u16,
    },
    /// A unix-domain socket in `dir`, named after `port` like libpq does.
    Unix {
        /// Directory that holds the socket (PostgreSQL's `unix_socket_directories`).
        dir: PathBuf,
        /// Port number that names the socket file.
        port: u16,
    },
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream::Tcp {
            host: "127.0.0.1".to_owned(),
            port: DEFAULT_PG_PORT,
        }
    }
}

impl Upstream {
    /// The socket file to connect to for [`Upstream::Unix`] (`dir/.s.PGSQL.<port>`); `None` for
    /// TCP. Keeps the libpq naming rule in one place.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match self {
            Upstream::Tcp { .. } => None,
            Upstream::Unix { dir, port } => Some(dir.join(format!(".s.PGSQL.{port}"))),
        }
    }
}

/// Why an upstream address string was rejected; the message quotes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid upstream address {input:?}: {reason}")]
pub struct UpstreamParseError {
    input: String,
    reason: String,
}

impl UpstreamParseError {
    fn new(input: &str, reason: impl Into<String>) -> Self {
        Self {
            input: input.to_owned(),
            reason: reason.into(),
        }
    }
}

fn parse_port(input: &str, port: &str) -> Result<u16, UpstreamParseError> {
    match port.parse::<u16>() {
        Ok(0) => Err(UpstreamParseError::new(input, "port must be 1-65535")),
        Ok(p) => Ok(p),
        Err(_) => Err(UpstreamParseError::new(
            input,
            format!("port {port:?} is not a number in 1-65535"),
        )),
    }
}

impl FromStr for Upstream {
    type Err = UpstreamParseError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        let err = |reason: &str| UpstreamParseError::new(input, reason);
        if s.is_empty() {
            return Err(err(
                "empty; expected \"host:port\" or \"/socket/dir[:port]\"",
            ));
        }

        if s.starts_with('/') {
            // A trailing ":digits" is the port; anything else is part of the directory name.
            let (dir, port) = match s.rsplit_once(':') {
                Some((dir, port))
                    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    (dir, parse_port(input, port)?)
                }
                _ => (s, DEFAULT_PG_PORT),
            };
            return Ok(Upstream::Unix {
                dir: PathBuf::from(dir),
                port,
            });
        }

        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (addr, after) = rest
                .split_once(']')
                .ok_or_else(|| err("missing ']' after IPv6 address"))?;
            addr.parse::<Ipv6Addr>()
                .map_err(|_| err("not an IPv6 address inside [...]"))?;
            let port = after
                .strip_prefix(':')
                .ok_or_else(|| err("missing port; write \"[addr]:5432\""))?;
            (addr, port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| err("missing port; write \"host:5432\""))?;
            if host.contains(':') {
                return Err(err(
                    "IPv6 addresses must be in brackets, e.g. \"[::1]:5432\"",
                ));
            }
            if host.contains('/') {
                return Err(err("a unix socket directory must be an absolute path"));
            }
            if host.is_empty() || host.chars().any(char::is_whitespace) {
                return Err(err("host is empty or contains whitespace"));
            }
            (host, port)
        };
        Ok(Upstream::Tcp {
            host: host.to_owned(),
            port: parse_port(input, port)?,
        })
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Upstream::Tcp { host, port } => write!(f, "{host}:{port}"),
            Upstream::Unix { dir, port } => write!(f, "{}:{port}", Path::display(dir)),
        }
    }
}

impl TryFrom<String> for Upstream {
    type Error = UpstreamParseError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Upstream> for String {
    fn from(u: Upstream) -> Self {
        u.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> Upstream {
        Upstream::Tcp {
            host: host.to_owned(),
            port,
        }
    }

    fn unix(dir: &str, port: u16) -> Upstream {
        Upstream::Unix {
            dir: PathBuf::from(dir),
            port,
        }
    }

    #[test]
    fn tcp_forms_parse_and_display_back() {
        for (text, want) in [
            ("db.internal:5432", tcp("db.internal", 5432)),
            ("localhost:6000", tcp("localhost", 6000)),
            ("10.1.2.3:5433", tcp("10.1.2.3", 5433)),
            ("[::1]:5432", tcp("::1", 5432)),
            ("[fe80::1:2]:15432", tcp("fe80::1:2", 15432)),
        ] {
            let got: Upstream = text.parse().unwrap();
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text);
            assert_eq!(got.socket_path(), None);
        }
    }

    #[test]
    fn unix_dir_defaults_to_port_5432_and_names_the_socket_like_libpq() {
        let u: Upstream = "/var/run/postgresql".parse().unwrap();
        assert_eq!(u, unix("/var/run/postgresql", 5432));
        assert_eq!(
            u.socket_path(),
            Some(PathBuf::from("/var/run/postgresql/.s.PGSQL.5432"))
        );
        assert_eq!(u.to_string(), "/var/run/postgresql:5432");
        assert_eq!(u.to_string().parse::<Upstream>().unwrap(), u);
    }

    #[test]
    fn unix_dir_with_port() {
        let u: Upstream = "/tmp/pg:5433".parse().unwrap();
        assert_eq!(u, unix("/tmp/pg", 5433));
        assert_eq!(
            u.socket_path(),
            Some(PathBuf::from("/tmp/pg/.s.PGSQL.5433"))
        );
    }

    #[test]
    fn bad_addresses_are_rejected_with_a_reason() {
        for (text, reason) in [
            ("", "empty"),
            ("localhost", "missing port"),
            ("localhost:", "not a number"),
            ("localhost:abc", "not a number"),
            ("localhost:70000", "not a number"),
            ("localhost:0", "1-65535"),
            (":5432", "host is empty"),
            ("::1:5432", "brackets"),
            ("[::1]", "missing port"),
            ("[::1:5432", "missing ']'"),
            ("[not-v6]:5432", "IPv6"),
            ("tmp/pg:5432", "absolute path"),
            ("/tmp/pg:0", "1-65535"),
            ("/tmp/pg:99999", "not a number"),
        ] {
            let err = text.parse::<Upstream>().unwrap_err().to_string();
            assert!(err.contains(reason), "{text:?}: {err}");
            assert!(err.contains(&format!("{text:?}")), "{err}");
        }
    }
}
