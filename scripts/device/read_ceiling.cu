// The ceiling of a memory-bound kernel at kiln bench-kernels' mat-vec sizes: how fast a
// kernel that only reads the weight's bytes runs when launched back to back, as a
// fraction of the device-to-device copy bandwidth (bytes read plus written), which is
// the reference bench-kernels reports against.
//
// It times the read kernel with bench-kernels' method (launches queued behind a long
// copy, operands cycled through 256 MiB so the L2 cache cannot hold them, CUDA events,
// median of 5 runs of 20 launches), once launched plainly and once with programmatic
// dependent launch, where each launch may start while the previous one drains.
//
// Build and run on the GPU machine (it has nvcc; this machine does not):
//   nvcc -O3 -std=c++17 -arch=sm_90 scripts/device/read_ceiling.cu -o /tmp/read_ceiling
//   /tmp/read_ceiling
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                                   \
    do {                                                                           \
        cudaError_t e = (x);                                                       \
        if (e != cudaSuccess) {                                                    \
            fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e));                \
            exit(1);                                                               \
        }                                                                          \
    } while (0)

// Reads n16 16-byte words; writes one word only if their xor is a value it never is,
// so the loads cannot be removed. Lets the next launch start at once and waits for
// the previous one before its (never taken) write.
__global__ void read_words(const uint4* p, size_t n16, unsigned* sink) {
    asm volatile("griddepcontrol.launch_dependents;");
    unsigned a = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n16;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = p[i];
        a ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (a == 0x9e3779b9u) {
        sink[0] = a;
    }
}

static const size_t FILL = 1ull << 30;
static const size_t COLD = 256ull << 20;
static char *filler, *filler_copy;
static cudaEvent_t start, stop;

// Median over 5 runs of microseconds per launch of `launch(i)`, 20 launches per run
// queued behind a 1 GiB copy.
template <class F>
static float median_us(F launch) {
    std::vector<float> runs;
    for (int r = 0; r < 5; ++r) {
        launch(0);
        CHECK(cudaMemcpyAsync(filler_copy, filler, FILL, cudaMemcpyDeviceToDevice));
        CHECK(cudaEventRecord(start));
        for (int i = 0; i < 20; ++i) launch(i);
        CHECK(cudaEventRecord(stop));
        CHECK(cudaEventSynchronize(stop));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, start, stop));
        runs.push_back(ms * 1000.0f / 20);
    }
    std::sort(runs.begin(), runs.end());
    return runs[2];
}

static void launch_read(bool pdl, int blocks, const uint4* p, size_t n16, unsigned* sink) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(512);
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = pdl ? 1 : 0;
    CHECK(cudaLaunchKernelEx(&cfg, read_words, p, n16, sink));
}

struct Format {
    const char* name;
    size_t block_elems, block_bytes;
};

int main() {
    const Format formats[] = {{"f32", 1, 4},   {"f16", 1, 2},    {"q4_0", 32, 18},
                              {"q4_1", 32, 20}, {"q5_0", 32, 22}, {"q5_1", 32, 24},
                              {"q8_0", 32, 34}, {"q4_k", 256, 144}, {"q5_k", 256, 176},
                              {"q6_k", 256, 210}};
    const size_t shapes[][2] = {{4096, 4096}, {4096, 14336}, {14336, 4096}, {151936, 4096}};
    int sms;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    CHECK(cudaMalloc(&filler, FILL));
    CHECK(cudaMalloc(&filler_copy, FILL));
    CHECK(cudaMemset(filler, 1, FILL));
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    unsigned* sink;
    CHECK(cudaMalloc(&sink, 4));
    const float copy_us = median_us([&](int) {
        CHECK(cudaMemcpyAsync(filler_copy, filler, FILL, cudaMemcpyDeviceToDevice));
    });
    const double copy = 2.0 * FILL / (copy_us * 1e-6);
    printf("copy bandwidth %.1f GB/s (1 GiB, read + write)\n", copy / 1e9);
    printf("%-6s %-13s %10s %10s %8s %10s %8s\n", "format", "n x k", "MB", "read us", "% copy",
           "pdl us", "% copy");
    for (const Format& f : formats) {
        for (const auto& s : shapes) {
            const size_t bytes = s[0] * (s[1] / f.block_elems * f.block_bytes);
            const size_t copies = std::min<size_t>(64, std::max<size_t>(1, (COLD + bytes - 1) / bytes));
            char* w;
            CHECK(cudaMalloc(&w, bytes * copies));
            CHECK(cudaMemset(w, 0x5a, bytes * copies));
            auto run = [&](bool pdl) {
                return median_us([&](int i) {
                    launch_read(pdl, 4 * sms, (const uint4*)(w + (i % copies) * bytes), bytes / 16, sink);
                });
            };
            const float plain = run(false), pdl = run(true);
            printf("%-6s %6zux%-6zu %10.1f %10.1f %7.1f%% %10.1f %7.1f%%\n", f.name, s[0], s[1],
                   bytes / 1e6, plain, 100.0 * bytes / (plain * 1e-6) / copy, pdl,
                   100.0 * bytes / (pdl * 1e-6) / copy);
            CHECK(cudaFree(w));
        }
    }
    return 0;
}
