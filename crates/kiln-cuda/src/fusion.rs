//! The fusions compiling a graph may make: runs of consecutive ops that one launch
//! computes ([`Run`]), found in a graph by [`find`], each kind switched by an
//! environment variable ([`Fusion`]). What each computes is in its op family's module:
//! [`ops::fused_matvec`] (a norm before a resident mat-vec, a gated unit or rotation
//! after it), [`ops::moe_epilogue`] (the gated unit or combine after a routed product),
//! [`ops::router_matvec`] (a router with the product of its logits) and
//! [`ops::sibling_matvec`] (products of one activation row side by side).

use kiln_core::ops::{MatMul, MoeMatMul, MoeRouter};
use kiln_core::{Bindings, DeviceBuffer, Graph, Result};

use crate::ops;
use crate::registry::KernelSpec;
use crate::{CudaBackend, CudaBuffer};

/// A kind of fusion, switched by its environment variable ([`Fusion::env`]): `1` turns
/// it on, `0` off; unset, its default ([`Fusion::default_on`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fusion {
    /// A one-row residual add and RMSNorm into the resident mat-vec that reads it.
    Norms,
    /// A one-row SiLU gated unit into the epilogue of the resident gate-up mat-vec
    /// before it, and a decode token's experts' gated units into their routed gate-up
    /// mat-vec.
    Glus,
    /// A one-token rotation and KV-cache append into the epilogue of the resident
    /// q-k-v mat-vec before it.
    Ropes,
    /// A one-token mixture-of-experts router into the f32 product of its logits.
    Routers,
    /// A decode token's weighted sum of its experts' outputs (without residual or
    /// shared expert) into the epilogue of their routed down mat-vec.
    Combines,
    /// Consecutive one-row products of the same activation row into one resident
    /// mat-vec.
    Siblings,
}

impl Fusion {
    /// Every kind.
    pub const ALL: [Fusion; 6] = [
        Fusion::Norms,
        Fusion::Glus,
        Fusion::Ropes,
        Fusion::Routers,
        Fusion::Combines,
        Fusion::Siblings,
    ];

    /// The environment variable that switches it.
    pub fn env(self) -> &'static str {
        match self {
            Fusion::Norms => "KILN_CUDA_FUSE_NORMS",
            Fusion::Glus => "KILN_CUDA_FUSE_GLUS",
            Fusion::Ropes => "KILN_CUDA_FUSE_ROPES",
            Fusion::Routers => "KILN_CUDA_FUSE_ROUTERS",
            Fusion::Combines => "KILN_CUDA_FUSE_COMBINES",
            Fusion::Siblings => "KILN_CUDA_FUSE_SIBLINGS",
        }
    }

    /// Whether it is on where its variable is unset: the norms and the siblings, which
    /// measured faster than the launches they replace (docs/perf.md); the others
    /// measured slower (the work of a ticket's last warp lengthens the launch's tail
    /// more than the launch it saves) and stay for comparison.
    pub fn default_on(self) -> bool {
        matches!(self, Fusion::Norms | Fusion::Siblings)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Which kinds of fusion are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fusions(u8);

impl Fusions {
    /// None on.
    pub const NONE: Fusions = Fusions(0);

    /// Every kind on.
    pub fn all() -> Self {
        Fusion::ALL
            .into_iter()
            .fold(Self::NONE, |f, kind| f.with(kind, true))
    }

    /// As the environment switches them ([`Fusion::env`]), each kind's default where
    /// its variable is unset or neither `0` nor `1`.
    pub fn from_env() -> Self {
        Fusion::ALL.into_iter().fold(Self::NONE, |f, kind| {
            let on = match std::env::var(kind.env()).as_deref() {
                Ok("1") => true,
                Ok("0") => false,
                _ => kind.default_on(),
            };
            f.with(kind, on)
        })
    }

    /// These with `kind` on or off.
    pub fn with(self, kind: Fusion, on: bool) -> Self {
        if on {
            Fusions(self.0 | kind.bit())
        } else {
            Fusions(self.0 & !kind.bit())
        }
    }

    /// Whether `kind` is on.
    pub fn contains(self, kind: Fusion) -> bool {
        self.0 & kind.bit() != 0
    }

    /// The bits, for storing in an atomic.
    pub(crate) fn bits(self) -> u8 {
        self.0
    }

    /// The kinds `bits` ([`Fusions::bits`]) holds.
    pub(crate) fn from_bits(bits: u8) -> Self {
        Fusions(bits)
    }
}

/// Consecutive ops of a graph that one launch computes.
#[derive(Clone, Debug)]
pub enum Run<'g> {
    /// A one-token router's f32 product and the router.
    Router(&'g MatMul, &'g MoeRouter),
    /// A routed product and the gated unit or combine after it.
    Routed(&'g MoeMatMul, ops::moe_epilogue::Epilogue<'g>),
    /// A resident mat-vec with a norm before it, an epilogue after it, or both.
    Resident(ops::fused_matvec::Fusion<'g>),
    /// Products of one activation row side by side.
    Siblings(ops::sibling_matvec::Siblings<'g>),
}

impl Run<'_> {
    /// How many ops of the graph the launch stands for.
    pub fn ops(&self) -> usize {
        match self {
            Run::Router(..) | Run::Routed(..) => 2,
            Run::Resident(fusion) => fusion.ops(),
            Run::Siblings(siblings) => siblings.products.len(),
        }
    }

    /// The kernel the launch runs.
    pub fn spec(&self, graph: &Graph) -> Result<KernelSpec> {
        match self {
            Run::Router(product, router) => ops::router_matvec::spec_of(graph, product, router),
            Run::Routed(product, epilogue) => ops::moe_epilogue::spec_of(graph, product, *epilogue),
            Run::Resident(fusion) => fusion.spec(graph),
            Run::Siblings(siblings) => siblings.spec(graph),
        }
    }

    /// Whether the launch's outputs are in memory of their own, apart from each other
    /// and from every input, as `bindings` holds them.
    pub fn operands_apart<B: DeviceBuffer>(&self, bindings: &Bindings<'_, B>) -> bool {
        match self {
            Run::Router(product, router) => {
                ops::router_matvec::operands_apart(product, router, bindings)
            }
            Run::Routed(product, epilogue) => {
                ops::moe_epilogue::operands_apart(product, *epilogue, bindings)
            }
            Run::Resident(fusion) => ops::fused_matvec::operands_apart(fusion, bindings),
            Run::Siblings(siblings) => ops::sibling_matvec::operands_apart(siblings, bindings),
        }
    }

    /// Launches (or records) it on the buffers `bindings` holds.
    pub(crate) fn launch(
        &self,
        backend: &CudaBackend,
        graph: &Graph,
        bindings: &mut Bindings<'_, CudaBuffer>,
    ) -> Result<()> {
        match self {
            Run::Router(product, router) => {
                ops::router_matvec::run(backend, graph, product, router, bindings)
            }
            Run::Routed(product, epilogue) => {
                ops::moe_epilogue::run(backend, graph, product, *epilogue, bindings)
            }
            Run::Resident(fusion) => ops::fused_matvec::run(backend, graph, fusion, bindings),
            Run::Siblings(siblings) => ops::sibling_matvec::run(backend, graph, siblings, bindings),
        }
    }
}

/// The run starting at op `index` of `graph` that one launch computes, of a kind
/// `fusions` has on, if there is one.
pub fn find(graph: &Graph, index: usize, fusions: Fusions) -> Option<Run<'_>> {
    if fusions.contains(Fusion::Routers) {
        if let Some((product, router)) = ops::router_matvec::fusible(graph, index) {
            return Some(Run::Router(product, router));
        }
    }
    let routed = ops::moe_epilogue::RoutedFusions {
        glus: fusions.contains(Fusion::Glus),
        combines: fusions.contains(Fusion::Combines),
    };
    if let Some((product, epilogue)) = ops::moe_epilogue::fusible(graph, index, routed) {
        return Some(Run::Routed(product, epilogue));
    }
    let resident = ops::fused_matvec::Fusions {
        norms: fusions.contains(Fusion::Norms),
        glus: fusions.contains(Fusion::Glus),
        ropes: fusions.contains(Fusion::Ropes),
    };
    if let Some(fusion) = ops::fused_matvec::fusible(graph, index, resident) {
        return Some(Run::Resident(fusion));
    }
    if fusions.contains(Fusion::Siblings) {
        return ops::sibling_matvec::fusible(graph, index).map(Run::Siblings);
    }
    None
}

/// The distinct kernels of the runs of `graph` that `fusions` fuses, in graph order:
/// what compiling it launches beside its ops' own kernels
/// ([`crate::manifest::specs_for_graph`]). Runs whose operands the bindings put in
/// shared memory are not fused when compiled; their kernels are listed all the same.
pub fn specs_for_graph(graph: &Graph, fusions: Fusions) -> Result<Vec<KernelSpec>> {
    let mut specs: Vec<KernelSpec> = Vec::new();
    let mut index = 0;
    while index < graph.ops().len() {
        match find(graph, index, fusions) {
            Some(run) => {
                let spec = run.spec(graph)?;
                if !specs.iter().any(|s| s.key == spec.key) {
                    specs.push(spec);
                }
                index += run.ops();
            }
            None => index += 1,
        }
    }
    Ok(specs)
}
