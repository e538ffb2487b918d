//! Maglev table build time at M = 65537 for 10, 100 and 1,000 backends (`cargo xtask bench` runs
//! it and reports criterion's median; `cargo bench -p lb-userspace --bench maglev` alone works too).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use lb_userspace::l4::maglev::{Member, Table};

const M: u32 = 65_537;

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    for n in [10usize, 100, 1000] {
        // Identities as the agent spells them: the canonical socket address.
        let names: Vec<String> = (0..n)
            .map(|i| format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256))
            .collect();
        let members: Vec<Member<'_>> = names
            .iter()
            .map(|identity| Member {
                identity,
                weight: 1,
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &members, |b, m| {
            b.iter(|| Table::build(black_box(m), M).expect("valid members"))
        });
    }
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
