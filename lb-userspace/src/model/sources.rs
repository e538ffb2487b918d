//! Where instances and configuration come from: the settings of the file, Redis and etcd
//! sources.

use std::{path::PathBuf, time::Duration};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProvidersSpec {
    pub files: Vec<FileProviderSpec>,
    pub redis: Option<RedisSpec>,
    pub etcd: Option<EtcdSpec>,
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
}
