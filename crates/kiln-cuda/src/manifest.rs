//! The manifest: every kernel family with its embedded source, the shared headers,
//! and every specialisation, so that precompilation can enumerate them all.

use kiln_core::{Graph, Op, Result};

use crate::ops;
use crate::registry::{KernelSource, KernelSpec};

/// Headers every kernel source may `#include`, handed to NVRTC in memory.
pub const HEADERS: &[KernelSource] = &[KernelSource {
    name: "common.cuh",
    text: include_str!("../kernels/common.cuh"),
}];

/// A kernel family: one `.cu` file, named like its op family in `kiln_core::ops`.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    pub name: &'static str,
    pub source: KernelSource,
}

impl Family {
    /// The specialisation of this family with canonical `key` whose entry point is
    /// `name_expression`.
    pub fn spec(&self, key: String, name_expression: String) -> KernelSpec {
        KernelSpec {
            key,
            source: self.source,
            headers: HEADERS,
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

/// Every family.
pub const FAMILIES: [Family; 3] = [CAST, ELEMENTWISE, NORM];

/// Every specialisation of every family.
pub fn all_specs() -> Vec<KernelSpec> {
    let mut specs = ops::cast::all_specs();
    specs.extend(ops::elementwise::all_specs());
    specs.extend(ops::norm::all_specs());
    specs
}

/// Whether the CUDA backend has a kernel for `op`'s kind.
pub fn has_kernel(op: &Op) -> bool {
    matches!(
        op,
        Op::Cast(_) | Op::Elementwise(_) | Op::RmsNorm(_) | Op::AddRmsNorm(_)
    )
}

/// The specialisation that runs `op` of `graph`. Errors with
/// [`kiln_core::Error::Unsupported`] for ops the CUDA backend does not implement.
pub fn spec_for_op(op: &Op, graph: &Graph) -> Result<KernelSpec> {
    match op {
        Op::Cast(c) => ops::cast::spec(graph.desc(c.x)?.dtype, graph.desc(c.out)?.dtype),
        Op::Elementwise(e) => Ok(ops::elementwise::spec(e.kind)),
        Op::RmsNorm(n) => Ok(ops::norm::spec(n.weight.is_some(), false)),
        Op::AddRmsNorm(n) => Ok(ops::norm::spec(n.weight.is_some(), true)),
        other => Err(kiln_core::Error::Unsupported(format!(
            "cuda backend: op {} is not implemented yet",
            other.name()
        ))),
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
