// Cast: out[i] = Out(In(x[i])) for F32, F16 and BF16, converting through f32 (exact
// for every pair kiln supports), rounding to nearest even.
#include "common.cuh"

namespace kiln {

template <typename In, typename Out>
__global__ void cast(const typename In::storage* __restrict__ x,
                     typename Out::storage* __restrict__ out, u64 len) {
    chain_after_prior_grids(x);
    for (u64 i = global_index(); i < len; i += grid_stride()) {
        out[i] = Out::store(In::load(x[i]));
    }
}

}  // namespace kiln
