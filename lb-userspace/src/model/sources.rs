//! Where instances and configuration come from: the settings of the file, Redis and etcd
//! sources.

use std::{path::PathBuf, time::Duration};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProvidersSpec {
    pub files: Vec<FileProviderSpec>,
    pub redis: Option<RedisSpec>,
    pub etcd: Option<EtcdSpec>,
    pub dns: DnsSpec,
}

/// How the host names of Traefik servers are resolved and followed (`[providers.dns]`): each
/// is asked again when its answer's TTL runs out (or every `refresh`), and a changed answer is
/// a new set of upstreams.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSpec {
    /// The DNS server asked; `None`: the system's (`/etc/resolv.conf`, `/etc/hosts`).
    pub resolver: Option<std::net::SocketAddr>,
    /// Asked again this often whatever the TTLs say.
    pub refresh: Option<Duration>,
    /// A TTL shorter than this (0 included) counts as this long: a name is never asked in a loop.
    pub min_ttl: Duration,
}

impl Default for DnsSpec {
    fn default() -> Self {
        DnsSpec {
            resolver: None,
            refresh: None,
            min_ttl: Duration::from_secs(1),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProviderSpec {
    pub path: PathBuf,
    pub debounce: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisSpec {
    pub url: String,
    pub prefix: String,
    pub resync: Duration,
    /// Where a Traefik configuration is stored in Traefik's KV layout (`traefik`), if any.
    pub traefik_root: Option<String>,
    /// The directories that configuration's records may name files in (certificates, keys,
    /// CAs, users files); none by default, so a record cannot make the agent read a file.
    pub traefik_file_dirs: Vec<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdSpec {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub traefik_root: Option<String>,
    /// As [`RedisSpec::traefik_file_dirs`].
    pub traefik_file_dirs: Vec<PathBuf>,
    pub auth: Option<EtcdAuth>,
    pub tls: Option<EtcdTls>,
}

/// TLS to etcd (its endpoints are then `https://`): the CA that signed etcd's certificate, and
/// a client certificate when etcd asks for one (`--client-cert-auth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name etcd's certificate must carry, when it is not the endpoint's host.
    pub server_name: Option<String>,
}

/// etcd's own authentication: a user of etcd's RBAC. The password is read from a file at load
/// time, so it is never in lb.toml (nor in `lb check-config`'s output).
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// `[cluster]`: the nodes that share one etcd prefix. The API store lives in etcd under
/// `<prefix>clusters/<name>/store/`, and each node's status under `…/nodes/<node>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    pub name: String,
    pub node: String,
    pub etcd: EtcdSpec,
    /// A node's status key lives this long after its last refresh (the lease's TTL).
    pub status_ttl: Duration,
}
