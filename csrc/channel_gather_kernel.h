// Channel gather: the torch-free part shared by the CPU kernel, the CUDA kernel and the CUDA binding.
//
// One gather job copies   dst[o, i, r] = src[out_index[o], in_index[i], r]   into a contiguous dst,
// where r runs over the trailing ("rest") dims of src. A job is described by a plain-old-data
// RnipGatherDesc so that the same bytes serve the CPU loop and a device-side table for the CUDA
// kernel (one launch gathers many tensors of the same element size). Nothing here depends on the
// element type: copies move elem_size bytes, so every dtype torch has (bool, fp8, complex) works.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RNIP_EXT_HD __host__ __device__ __forceinline__
#else
#define RNIP_EXT_HD inline
#endif

// Trailing dims left after collapsing mergeable ones. Real weights need at most two (channels_last
// conv weights: kh*kw with one stride); a src needing more is made contiguous by the caller.
#define RNIP_EXT_MAX_REST_DIMS 8

// Output elements handled by one CUDA tile; tiles never straddle two jobs.
#define RNIP_EXT_GATHER_TILE 4096

// Descriptors per CUDA launch: they travel as the kernel's by-value argument (a RnipGatherBatch,
// kept under the 4 KB kernel-parameter limit), so a launch needs no device-side table, no host
// staging buffer and no copy -- which keeps it capturable in a CUDA graph.
#define RNIP_EXT_GATHER_BATCH 15

struct RnipGatherDesc {
    const void* src;          // data pointer of src (its storage offset already applied)
    void* dst;                // contiguous output, numel elements
    const void* out_index;    // [n_out] int32/int64 with stride out_index_stride; null = identity
    const void* in_index;     // [n_in]  int32/int64 with stride in_index_stride; null = identity
    int64_t out_index_stride; // in index elements
    int64_t in_index_stride;
    int64_t n_out;            // output size along dim 0
    int64_t n_in;             // output size along dim 1 (1 when dim 1 is folded into the rest)
    int64_t src_size0;        // bound for out_index values
    int64_t src_size1;        // bound for in_index values
    int64_t src_stride0;      // in elements
    int64_t src_stride1;
    int64_t inner;            // elements per (o, i) row = product of rest_sizes
    int64_t numel;            // n_out * n_in * inner
    int64_t tile_begin;       // first CUDA tile of this job within its launch
    int32_t out_index_is_int32;
    int32_t in_index_is_int32;
    int32_t rest_ndim;
    int32_t job;              // position of the job in the caller's list, for error messages
    int64_t rest_sizes[RNIP_EXT_MAX_REST_DIMS];
    int64_t rest_strides[RNIP_EXT_MAX_REST_DIMS];  // of src, in elements
};

// Reads entry k of an int32/int64 index (null index: the identity map).
RNIP_EXT_HD int64_t rnip_ext_load_index(const void* index, int32_t is_int32, int64_t stride, int64_t k) {
    if (index == nullptr) return k;
    return is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(index)[k * stride])
                    : static_cast<const int64_t*>(index)[k * stride];
}

// Sorts out the rest dims of a job: drops size-1 dims and merges neighbours that are laid out as one
// (stride[d] == stride[d+1] * size[d+1]), since the output is contiguous over them anyway. Fewer
// dims mean long unit-stride runs (memcpy on CPU) and fewer divisions on the GPU. Returns false
// when more than RNIP_EXT_MAX_REST_DIMS dims remain; the caller then retries with a contiguous src.
inline bool rnip_ext_set_rest_dims(RnipGatherDesc* d, const int64_t* sizes, const int64_t* strides, int ndim) {
    int64_t tmp_sizes[64];
    int64_t tmp_strides[64];
    int n = 0;
    int64_t inner = 1;
    for (int k = 0; k < ndim; ++k) {
        inner *= sizes[k];
        if (sizes[k] == 1) continue;
        if (n > 0 && tmp_strides[n - 1] == strides[k] * sizes[k]) {
            tmp_sizes[n - 1] *= sizes[k];
            tmp_strides[n - 1] = strides[k];
            continue;
        }
        if (n == 64) return false;
        tmp_sizes[n] = sizes[k];
        tmp_strides[n] = strides[k];
        ++n;
    }
    if (n > RNIP_EXT_MAX_REST_DIMS) return false;
    for (int k = 0; k < n; ++k) {
        d->rest_sizes[k] = tmp_sizes[k];
        d->rest_strides[k] = tmp_strides[k];
    }
    d->rest_ndim = n;
    d->inner = inner;
    return true;
}

// Numbers the tiles of a run of jobs (all of one element size) for one CUDA launch; returns the
// tile count. Jobs with no output get no tile.
inline int64_t rnip_ext_assign_tiles(RnipGatherDesc* descs, int n_descs) {
    int64_t tiles = 0;
    for (int k = 0; k < n_descs; ++k) {
        descs[k].tile_begin = tiles;
        tiles += (descs[k].numel + RNIP_EXT_GATHER_TILE - 1) / RNIP_EXT_GATHER_TILE;
    }
    return tiles;
}

// One launch's jobs, passed to the kernel by value.
struct RnipGatherBatch {
    RnipGatherDesc descs[RNIP_EXT_GATHER_BATCH];
    int64_t total_tiles;
    int32_t n_descs;
    int32_t pad;
};

#if defined(__CUDACC__) || defined(RNIP_EXT_WITH_CUDA)
#include <cuda_runtime_api.h>

// Performs every job of the host array descs[0, n_descs), all of elem_size bytes per element
// (1, 2, 4, 8 or 16), on `stream`: one kernel launch per RNIP_EXT_GATHER_BATCH jobs, the
// descriptors passed by value (nothing is allocated or copied, so the call can be captured in a
// CUDA graph). Index values are checked on the device: an out-of-range value fails a device
// assertion before any out-of-bounds read (cudaErrorAssert; the CUDA runtime prints which check
// failed at the next synchronisation), as index_select's does; the launch never synchronises.
// Returns the launch error (cudaSuccess when fine), cudaErrorInvalidValue for another elem_size.
cudaError_t rnip_ext_launch_channel_gather(const RnipGatherDesc* descs, int n_descs, int elem_size,
                                           cudaStream_t stream);
#endif
