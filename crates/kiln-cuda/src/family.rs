//! A kernel family (one `.cu` file of an op family) and the headers every kernel
//! source may include: what each `ops/<family>.rs` module declares its kernels with,
//! and what the manifest lists.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::registry::{KernelSource, KernelSpec};

/// The headers written in files, which every kernel source may `#include`.
const FILE_HEADERS: [KernelSource; 7] = [
    KernelSource {
        name: "common.cuh",
        text: include_str!("../kernels/common.cuh"),
    },
    KernelSource {
        name: "quant.cuh",
        text: include_str!("../kernels/quant.cuh"),
    },
    KernelSource {
        name: "reduce.cuh",
        text: include_str!("../kernels/reduce.cuh"),
    },
    KernelSource {
        name: "functors.cuh",
        text: include_str!("../kernels/functors.cuh"),
    },
    KernelSource {
        name: "matvec_staged.cuh",
        text: include_str!("../kernels/matvec_staged.cuh"),
    },
    KernelSource {
        name: "rope.cuh",
        text: include_str!("../kernels/rope.cuh"),
    },
    KernelSource {
        name: "moe.cuh",
        text: include_str!("../kernels/moe.cuh"),
    },
];

/// Headers every kernel source may `#include`, handed to NVRTC in memory: those
/// written in files and `constants.cuh`, generated from [`crate::constants`].
pub fn headers() -> &'static [KernelSource] {
    static HEADERS: OnceLock<[KernelSource; 8]> = OnceLock::new();
    HEADERS.get_or_init(|| {
        let [common, quant, reduce, functors, matvec_staged, rope, moe] = FILE_HEADERS;
        let constants = KernelSource {
            name: "constants.cuh",
            text: crate::constants::header(),
        };
        [
            constants,
            common,
            quant,
            reduce,
            functors,
            matvec_staged,
            rope,
            moe,
        ]
    })
}

/// A kernel family: one `.cu` file, named like its op family in `kiln_core::ops`.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub name: &'static str,
    pub source: KernelSource,
}

/// Specialisations derived by [`Family::spec`] in this process.
static SPEC_DERIVATIONS: AtomicU64 = AtomicU64::new(0);

/// How many kernel specialisations have been derived in this process (each dispatch
/// derives its kernel's when it runs; running a compiled executable derives none).
pub fn spec_derivations() -> u64 {
    SPEC_DERIVATIONS.load(Ordering::Relaxed)
}

impl Family {
    /// The specialisation of this family with canonical `key` whose entry point is
    /// `name_expression`.
    pub fn spec(&self, key: String, name_expression: String) -> KernelSpec {
        SPEC_DERIVATIONS.fetch_add(1, Ordering::Relaxed);
        KernelSpec {
            key,
            source: self.source,
            headers: headers(),
            name_expression,
            options: Vec::new(),
        }
    }
}
