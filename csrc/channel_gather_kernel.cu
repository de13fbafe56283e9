// CUDA kernel of the channel gather (device code only: no torch headers, see channel_gather_kernel.h).
//
// One launch serves a table of jobs of the same element size. The output elements of every job are
// cut into tiles of RNIP_EXT_GATHER_TILE; blocks walk the tiles grid-stride, look up the tile's job,
// stage its descriptor in shared memory and copy the tile, threads striding over its elements.
// Writes are coalesced (dst is contiguous); reads are coalesced whenever the innermost rest dim has
// unit stride, which holds for contiguous weights.
#include <cstdint>
#include <cstdio>

#include <cuda_runtime.h>

#include "channel_gather_kernel.h"

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

__device__ __forceinline__ int64_t checked_index(const void* index, int32_t is_int32, int64_t stride, int64_t k,
                                                 int64_t bound, int job, const char* name) {
    const int64_t v = rnip_ext_load_index(index, is_int32, stride, k);
    if (v < 0 || v >= bound) {
        printf("rnip_ext channel_gather: job %d: %s[%lld] = %lld is out of range [0, %lld)\n", job, name,
               static_cast<long long>(k), static_cast<long long>(v), static_cast<long long>(bound));
        __trap();
    }
    return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const RnipGatherDesc* __restrict__ descs, int n_descs, int64_t total_tiles) {
    // The descriptor is staged as 8-byte words: one coalesced read per tile instead of scattered
    // field loads inside the element loop.
    constexpr int kWords = static_cast<int>(sizeof(RnipGatherDesc) / sizeof(unsigned long long));
    static_assert(sizeof(RnipGatherDesc) % sizeof(unsigned long long) == 0, "descriptor is not 8-byte sized");
    __shared__ unsigned long long desc_words[kWords];
    __shared__ int desc_id;
    const RnipGatherDesc& d = *reinterpret_cast<const RnipGatherDesc*>(desc_words);

    for (int64_t tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
        if (threadIdx.x == 0) {
            // Last job whose first tile is <= tile; jobs without tiles share tile_begin with their
            // successor and are skipped by taking the last match.
            int lo = 0;
            int hi = n_descs - 1;
            while (lo < hi) {
                const int mid = (lo + hi + 1) / 2;
                if (descs[mid].tile_begin <= tile) {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            desc_id = lo;
        }
        __syncthreads();
        const unsigned long long* words = reinterpret_cast<const unsigned long long*>(descs + desc_id);
        for (int w = threadIdx.x; w < kWords; w += blockDim.x) desc_words[w] = words[w];
        __syncthreads();

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
                checked_index(d.out_index, d.out_index_is_int32, d.out_index_stride, o, d.src_size0, d.job,
                              "out_index") * d.src_stride0;
            if (d.in_index != nullptr) {
                offset += checked_index(d.in_index, d.in_index_is_int32, d.in_index_stride, i, d.src_size1, d.job,
                                        "in_index") * d.src_stride1;
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
        // Every thread must be done reading the staged descriptor before the next tile replaces it.
        __syncthreads();
    }
}

template <typename T>
cudaError_t launch(const RnipGatherDesc* descs, int n_descs, int64_t total_tiles, cudaStream_t stream) {
    int device = 0;
    int sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    // Enough resident blocks to cover memory latency; the tile loop takes the rest.
    const int64_t max_blocks = static_cast<int64_t>(sms) * 8;
    const unsigned int blocks = static_cast<unsigned int>(total_tiles < max_blocks ? total_tiles : max_blocks);
    gather_kernel<T><<<blocks, kThreads, 0, stream>>>(descs, n_descs, total_tiles);
    return cudaGetLastError();
}

}  // namespace

cudaError_t rnip_ext_launch_channel_gather(const RnipGatherDesc* descs, int n_descs, int64_t total_tiles,
                                           int elem_size, cudaStream_t stream) {
    if (n_descs <= 0 || total_tiles <= 0) return cudaSuccess;
    switch (elem_size) {
        case 1:
            return launch<uint8_t>(descs, n_descs, total_tiles, stream);
        case 2:
            return launch<uint16_t>(descs, n_descs, total_tiles, stream);
        case 4:
            return launch<uint32_t>(descs, n_descs, total_tiles, stream);
        case 8:
            return launch<unsigned long long>(descs, n_descs, total_tiles, stream);
        case 16:
            return launch<Bytes16>(descs, n_descs, total_tiles, stream);
        default:
            return cudaErrorInvalidValue;
    }
}
