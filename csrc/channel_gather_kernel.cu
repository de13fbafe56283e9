// CUDA kernel of the channel gather (device code only: no torch headers, see channel_gather_kernel.h).
//
// One launch serves a batch of jobs of the same element size, passed by value. The output
// elements of every job are cut into tiles of RNIP_EXT_GATHER_TILE; blocks walk the tiles
// grid-stride, look up the tile's job and copy the tile, threads striding over its elements.
// Writes are coalesced (dst is contiguous); reads are coalesced whenever the innermost rest dim
// has unit stride, which holds for contiguous weights.

// Device assertions report a bad index (see checked_index): they stay on in release builds.
#undef NDEBUG
#include <cassert>
#include <cstdint>

#include <cuda_runtime.h>

#include "channel_gather_kernel.h"

static_assert(sizeof(RnipGatherBatch) <= 4096, "a RnipGatherBatch must fit the 4 KB kernel-parameter limit");

namespace {

constexpr int kThreads = 256;

// complex128 and friends: moved as one aligned 16-byte word.
struct alignas(16) Bytes16 {
    unsigned long long lo;
    unsigned long long hi;
};

// 64-bit division is a long instruction sequence on the GPU; nearly every operand fits 32 bits.
__device__ __forceinline__ int64_t div_fast(int64_t a, int64_t b) {
    if (((a | b) >> 32) == 0) {
        return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
    }
    return a / b;
}

// An index value, checked: out of range, the device assertion stops the kernel before the read.
// The CUDA runtime reports a failed device assertion reliably (cudaErrorAssert at the next
// synchronisation, the failing check printed to stderr), unlike a printf before __trap, whose
// buffer may never be flushed; rnip_ext.ops.channel_gather(..., check_values=True) names the
// offending index and value in a ValueError instead.
__device__ __forceinline__ int64_t checked_index(const void* index, int32_t is_int32, int64_t stride, int64_t k,
                                                 int64_t bound) {
    const int64_t v = rnip_ext_load_index(index, is_int32, stride, k);
    assert(v >= 0 && v < bound && "rnip_ext channel_gather: index out of range");
    return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) gather_kernel(const __grid_constant__ RnipGatherBatch batch) {
    __shared__ int desc_id;
    for (int64_t tile = blockIdx.x; tile < batch.total_tiles; tile += gridDim.x) {
        if (threadIdx.x == 0) {
            // Last job whose first tile is <= tile; jobs without tiles share tile_begin with their
            // successor and are skipped by taking the last match.
            int lo = 0;
            int hi = batch.n_descs - 1;
            while (lo < hi) {
                const int mid = (lo + hi + 1) / 2;
                if (batch.descs[mid].tile_begin <= tile) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            desc_id = lo;
        }
        __syncthreads();
        // Every thread reads the same descriptor (a uniform, cached read of the parameter space).
        const RnipGatherDesc& d = batch.descs[desc_id];
        const T* __restrict__ src = static_cast<const T*>(d.src);
        T* __restrict__ dst = static_cast<T*>(d.dst);
        const int64_t first = (tile - d.tile_begin) * RNIP_EXT_GATHER_TILE;
        const int64_t last = min(first + static_cast<int64_t>(RNIP_EXT_GATHER_TILE), d.numel);
        for (int64_t e = first + threadIdx.x; e < last; e += blockDim.x) {
            const int64_t row = div_fast(e, d.inner);
            int64_t r = e - row * d.inner;
            const int64_t o = div_fast(row, d.n_in);
            const int64_t i = row - o * d.n_in;
            int64_t offset =
                checked_index(d.out_index, d.out_index_is_int32, d.out_index_stride, o, d.src_size0) * d.src_stride0;
            if (d.in_index != nullptr) {
                offset += checked_index(d.in_index, d.in_index_is_int32, d.in_index_stride, i, d.src_size1) *
                          d.src_stride1;
            } else {
                offset += i * d.src_stride1;
            }
            for (int k = d.rest_ndim - 1; k > 0; --k) {
                const int64_t q = div_fast(r, d.rest_sizes[k]);
                offset += (r - q * d.rest_sizes[k]) * d.rest_strides[k];
                r = q;
            }
            if (d.rest_ndim > 0) offset += r * d.rest_strides[0];
            dst[e] = src[offset];
        }
        // Every thread must be done with desc_id before the next tile replaces it.
        __syncthreads();
    }
}

template <typename T>
cudaError_t launch(const RnipGatherDesc* descs, int n_descs, cudaStream_t stream) {
    int device = 0;
    int sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    // Enough resident blocks to cover memory latency; the tile loop takes the rest.
    const int64_t max_blocks = static_cast<int64_t>(sms) * 8;
    for (int first = 0; first < n_descs; first += RNIP_EXT_GATHER_BATCH) {
        RnipGatherBatch batch{};
        batch.n_descs = n_descs - first < RNIP_EXT_GATHER_BATCH ? n_descs - first : RNIP_EXT_GATHER_BATCH;
        for (int k = 0; k < batch.n_descs; ++k) batch.descs[k] = descs[first + k];
        batch.total_tiles = rnip_ext_assign_tiles(batch.descs, batch.n_descs);
        if (batch.total_tiles == 0) continue;
        const unsigned int blocks =
            static_cast<unsigned int>(batch.total_tiles < max_blocks ? batch.total_tiles : max_blocks);
        gather_kernel<T><<<blocks, kThreads, 0, stream>>>(batch);
        err = cudaGetLastError();
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

}  // namespace

cudaError_t rnip_ext_launch_channel_gather(const RnipGatherDesc* descs, int n_descs, int elem_size,
                                           cudaStream_t stream) {
    if (n_descs <= 0) return cudaSuccess;
    switch (elem_size) {
        case 1:
            return launch<uint8_t>(descs, n_descs, stream);
        case 2:
            return launch<uint16_t>(descs, n_descs, stream);
        case 4:
            return launch<uint32_t>(descs, n_descs, stream);
        case 8:
            return launch<unsigned long long>(descs, n_descs, stream);
        case 16:
            return launch<Bytes16>(descs, n_descs, stream);
        default:
            return cudaErrorInvalidValue;
    }
}
