//! Builds the XDP programs (lb-ebpf) for bpfel-unknown-none with the pinned nightly, so
//! `cargo build` alone produces a complete agent. `cargo xtask` installs that toolchain and
//! bpf-linker first; see TOOLCHAIN.md for why the nightly is pinned.
use anyhow::{anyhow, Context as _};

/// The nightly whose LLVM (22) matches the bpf-linker that xtask installs.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";

fn main() -> anyhow::Result<()> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("no workspace root"))?
        .join("lb-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
