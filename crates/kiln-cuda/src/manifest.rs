//! The manifest: every kernel family with its embedded source, the shared headers,
//! and every specialisation, so that precompilation can enumerate them all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use kiln_core::{BufferId, Error, Graph, Op, Result};

use crate::ops;
use crate::registry::{KernelSource, KernelSpec};

/// The headers written in files, which every kernel source may `#include`.
const FILE_HEADERS: [KernelSource; 3] = [
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
];

/// Headers every kernel source may `#include`, handed to NVRTC in memory: those
/// written in files and `constants.cuh`, generated from [`crate::constants`].
pub fn headers() -> &'static [KernelSource] {
    static HEADERS: OnceLock<[KernelSource; 4]> = OnceLock::new();
    HEADERS.get_or_init(|| {
        let [common, quant, reduce] = FILE_HEADERS;
        let constants = KernelSource {
            name: "constants.cuh",
            text: crate::constants::header(),
        };
        [constants, common, quant, reduce]
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

/// [`kiln_core::ops::Cast`].
pub const CAST: Family = Family {
    name: "cast",
    source: KernelSource {
        name: "cast.cu",
        text: include_str!("../kernels/cast.cu"),
    },
};

/// [`kiln_core::ops::Elementwise`].
pub const ELEMENTWISE: Family = Family {
    name: "elementwise",
    source: KernelSource {
        name: "elementwise.cu",
        text: include_str!("../kernels/elementwise.cu"),
    },
};

/// [`kiln_core::ops::RmsNorm`] and [`kiln_core::ops::AddRmsNorm`].
pub const NORM: Family = Family {
    name: "norm",
    source: KernelSource {
        name: "norm.cu",
        text: include_str!("../kernels/norm.cu"),
    },
};

/// [`kiln_core::ops::Embedding`].
pub const EMBEDDING: Family = Family {
    name: "embedding",
    source: KernelSource {
        name: "embedding.cu",
        text: include_str!("../kernels/embedding.cu"),
    },
};

/// [`kiln_core::ops::Rope`] and [`kiln_core::ops::HeadNormRope`].
pub const ROPE: Family = Family {
    name: "rope",
    source: KernelSource {
        name: "rope.cu",
        text: include_str!("../kernels/rope.cu"),
    },
};

/// [`kiln_core::ops::MatMul`] with few activation rows (decode).
pub const MATVEC: Family = Family {
    name: "matvec",
    source: KernelSource {
        name: "matvec.cu",
        text: include_str!("../kernels/matvec.cu"),
    },
};

/// [`kiln_core::ops::MatMul`] with many activation rows (prefill), on tensor cores.
pub const MATMUL: Family = Family {
    name: "matmul",
    source: KernelSource {
        name: "matmul.cu",
        text: include_str!("../kernels/matmul.cu"),
    },
};

/// [`kiln_core::ops::Softmax`].
pub const SOFTMAX: Family = Family {
    name: "softmax",
    source: KernelSource {
        name: "softmax.cu",
        text: include_str!("../kernels/softmax.cu"),
    },
};

/// [`kiln_core::ops::KvAppend`].
pub const KV_CACHE: Family = Family {
    name: "kv_cache",
    source: KernelSource {
        name: "kv_cache.cu",
        text: include_str!("../kernels/kv_cache.cu"),
    },
};

/// [`kiln_core::ops::Attention`].
pub const ATTENTION: Family = Family {
    name: "attention",
    source: KernelSource {
        name: "attention.cu",
        text: include_str!("../kernels/attention.cu"),
    },
};

/// [`kiln_core::ops::Argmax`].
pub const ARGMAX: Family = Family {
    name: "argmax",
    source: KernelSource {
        name: "argmax.cu",
        text: include_str!("../kernels/argmax.cu"),
    },
};

/// [`kiln_core::ops::Sample`].
pub const SAMPLE: Family = Family {
    name: "sample",
    source: KernelSource {
        name: "sample.cu",
        text: include_str!("../kernels/sample.cu"),
    },
};

/// Every family.
pub const FAMILIES: [Family; 12] = [
    CAST,
    ELEMENTWISE,
    NORM,
    EMBEDDING,
    ROPE,
    MATVEC,
    MATMUL,
    SOFTMAX,
    KV_CACHE,
    ATTENTION,
    ARGMAX,
    SAMPLE,
];

/// Every specialisation of every family.
pub fn all_specs() -> Vec<KernelSpec> {
    let mut specs = ops::cast::all_specs();
    specs.extend(ops::elementwise::all_specs());
    specs.extend(ops::norm::all_specs());
    specs.extend(ops::embedding::all_specs());
    specs.extend(ops::rope::all_specs());
    specs.extend(ops::matmul::all_specs());
    specs.extend(ops::softmax::all_specs());
    specs.extend(ops::kv_cache::all_specs());
    specs.extend(ops::attention::all_specs());
    specs.push(ops::argmax::spec());
    specs.push(ops::sample::spec());
    specs
}

/// Whether the CUDA backend has a kernel for `op`: its kind and the parameters the
/// kernels are limited in (every weight, cache and float dtype the IR allows has one).
/// The one limit: attention's head dimension, with or without a Q8_1 copy of its
/// output ([`ops::attention::check_head_dim`]).
pub fn has_kernel(op: &Op) -> bool {
    match op {
        Op::Attention(a) => ops::attention::check_head_dim(a.head_dim, a.out_q8.is_some()).is_ok(),
        _ => true,
    }
}

/// The specialisation that runs `op` of `graph`. Errors with
/// [`kiln_core::Error::Unsupported`] for ops the CUDA backend does not implement.
pub fn spec_for_op(op: &Op, graph: &Graph) -> Result<KernelSpec> {
    if !has_kernel(op) {
        return Err(Error::Unsupported(format!(
            "cuda backend: op {} with these parameters has no kernel: {op:?}",
            op.name()
        )));
    }
    let dtype = |id: BufferId| graph.desc(id).map(|d| d.dtype);
    let bytes = |id: BufferId| graph.desc(id).map(|d| d.bytes());
    let optional = |id: Option<BufferId>| id.map(bytes).transpose();
    match op {
        Op::Cast(c) => ops::cast::spec(dtype(c.x)?, dtype(c.out)?),
        Op::Elementwise(e) => Ok(ops::elementwise::spec(e.kind)),
        Op::RmsNorm(n) => Ok(ops::norm::spec(n.weight.is_some(), false)),
        Op::AddRmsNorm(n) => Ok(ops::norm::spec(n.weight.is_some(), true)),
        Op::Embedding(e) => ops::embedding::spec(dtype(e.table)?),
        Op::Rope(r) => Ok(ops::rope::spec(r.params.style, false)),
        Op::HeadNormRope(r) => Ok(ops::rope::spec(r.params.style, true)),
        Op::QkvRopeAppend(r) => ops::rope::qkv_spec(r.params.style, dtype(r.k_cache)?),
        Op::Glu(g) => Ok(ops::elementwise::glu_spec(g.kind)),
        Op::MatMul(m) => ops::matmul::MatMulArgs {
            weight: dtype(m.w)?,
            m: m.m,
            n: m.n,
            k: m.k,
            x_bytes: bytes(m.x)?,
            x_q8_bytes: optional(m.x_q8)?,
            w_bytes: bytes(m.w)?,
            // A graph's weights are uploaded with upload_weight.
            w_packed: Some((dtype(m.w)?, m.k)),
            bias_bytes: optional(m.bias)?,
            out_bytes: bytes(m.out)?,
        }
        .check()
        .map(|plan| plan.spec),
        Op::Softmax(s) => Ok(ops::softmax::spec(s.causal_offset.is_some())),
        Op::KvAppend(k) => ops::kv_cache::spec(dtype(k.cache)?),
        Op::Attention(a) => ops::attention::AttentionArgs {
            shape: a.into(),
            cache: dtype(a.k_cache)?,
            q_bytes: bytes(a.q)?,
            k_bytes: bytes(a.k_cache)?,
            v_bytes: bytes(a.v_cache)?,
            positions_bytes: bytes(a.positions)?,
            out_bytes: bytes(a.out)?,
            out_q8_bytes: optional(a.out_q8)?,
        }
        .check()
        .map(|plan| plan.spec),
        Op::Argmax(_) => Ok(ops::argmax::spec()),
        Op::Sample(s) => Ok(ops::sample::spec_for(&s.params)),
    }
}

/// The distinct specialisations `graph`'s ops need, in first-use order.
pub fn specs_for_graph(graph: &Graph) -> Result<Vec<KernelSpec>> {
    let mut specs: Vec<KernelSpec> = Vec::new();
    for op in graph.ops() {
        let spec = spec_for_op(op, graph)?;
        if !specs.iter().any(|s| s.key == spec.key) {
            specs.push(spec);
        }
    }
    Ok(specs)
}
