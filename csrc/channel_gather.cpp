// The channel-gather op: schema, argument checks shared with the CUDA binding, and the CPU kernel.
//
//   channel_gather(src, out_index, in_index) = src[out_index][:, in_index]   (contiguous, a copy)
//
// out_index selects along dim 0, in_index along dim 1, either may be None (keep every channel); any
// trailing dims, dtypes and strides. channel_gather_many does the same for a list of tensors with
// one parallel loop (CPU) or one launch per element size (CUDA), to prune a whole model at once.
// Fake (meta) kernels and autograd formulas are registered from Python (rnip_ext/ops/channel_gather.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "channel_gather_kernel.h"

extern "C" {
// `from rnip_ext import _C` loads this shared library, which runs the TORCH_LIBRARY static
// initialisers below. The module itself is empty apart from two flags: WITH_CUDA tells Python
// whether a CUDA kernel was compiled in (a CPU-only build must fall back to index_select on CUDA
// tensors), WITH_OPENMP whether the CPU kernel runs multi-threaded.
PyMODINIT_FUNC PyInit__C(void) {
    static struct PyModuleDef module_def = {
        PyModuleDef_HEAD_INIT,
        "_C",                                                                          // m_name
        "Compiled kernels of the rnip_ext channel_gather ops (loaded for its side effects).",  // m_doc
        -1,                                                                            // m_size
        nullptr,                                                                       // m_methods
        nullptr,                                                                       // m_slots
        nullptr,                                                                       // m_traverse
        nullptr,                                                                       // m_clear
        nullptr,                                                                       // m_free
    };
    PyObject* module = PyModule_Create(&module_def);
    if (module == nullptr) return nullptr;
#ifdef RNIP_EXT_WITH_CUDA
    const long with_cuda = 1;
#else
    const long with_cuda = 0;
#endif
    // at::parallel_for is serial unless this file was compiled with OpenMP (-fopenmp), the
    // benchmark records which.
#ifdef _OPENMP
    const long with_openmp = 1;
#else
    const long with_openmp = 0;
#endif
    if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0 ||
        PyModule_AddIntConstant(module, "WITH_OPENMP", with_openmp) != 0) {
        Py_DECREF(module);
        return nullptr;
    }
    return module;
}
}

namespace rnip_ext {
namespace detail {

// Names of the arguments of one job as the user wrote them: "out_index" for the single form
// (job < 0), "out_indices[3]" for job 3 of the many-form.
struct ArgNames {
    const char* op;
    std::string src;
    std::string out_index;
    std::string in_index;
};

static ArgNames arg_names(int64_t job) {
    if (job < 0) return {"channel_gather", "src", "out_index", "in_index"};
    const std::string at = "[" + std::to_string(job) + "]";
    return {"channel_gather_many", "srcs" + at, "out_indices" + at, "in_indices" + at};
}

static void check_index_meta(const ArgNames& names, const std::string& name, const at::Tensor& src,
                             const at::Tensor& index) {
    TORCH_CHECK_VALUE(index.dim() == 1, names.op, ": ", name, " must be 1-D, got a ", index.dim(), "-D tensor");
    TORCH_CHECK_TYPE(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt, names.op, ": ", name,
                     " must be int64 or int32, got ", index.scalar_type());
    TORCH_CHECK_VALUE(index.device() == src.device(), names.op, ": ", name, " is on ", index.device(), " but ",
                      names.src, " is on ", src.device());
}

// Everything that can be checked without reading index values (the CUDA binding checks those on
// the device instead of synchronising).
void check_gather_args(int64_t job, const at::Tensor& src, const std::optional<at::Tensor>& out_index,
                       const std::optional<at::Tensor>& in_index) {
    const ArgNames names = arg_names(job);
    TORCH_CHECK_VALUE(src.dim() >= 1, names.op, ": ", names.src, " must have at least 1 dimension, got a 0-D tensor");
    TORCH_CHECK_VALUE(src.layout() == at::kStrided, names.op, ": ", names.src, " must be a strided (dense) tensor");
    if (out_index.has_value()) check_index_meta(names, names.out_index, src, *out_index);
    if (in_index.has_value()) {
        TORCH_CHECK_VALUE(src.dim() >= 2, names.op, ": ", names.in_index, " was given but ", names.src,
                          " is 1-D (only out_index applies to it)");
        check_index_meta(names, names.in_index, src, *in_index);
    }
}

template <typename I>
static void check_values_typed(const ArgNames& names, const std::string& name, const at::Tensor& index,
                               int64_t bound, int dim) {
    const I* p = index.const_data_ptr<I>();
    const int64_t n = index.size(0);
    const int64_t stride = index.stride(0);
    for (int64_t k = 0; k < n; ++k) {
        const int64_t v = static_cast<int64_t>(p[k * stride]);
        TORCH_CHECK_VALUE(v >= 0 && v < bound, names.op, ": ", name, "[", k, "] = ", v, " is out of range [0, ",
                          bound, ") of dim ", dim, " of ", names.src, " (negative indices are not allowed)");
    }
}

static void check_values_cpu(const ArgNames& names, const std::string& name, const at::Tensor& index, int64_t bound,
                             int dim) {
    if (index.scalar_type() == at::kInt) {
        check_values_typed<int32_t>(names, name, index, bound, dim);
    } else {
        check_values_typed<int64_t>(names, name, index, bound, dim);
    }
}

// The contiguous result of one job (shape only; no data written).
at::Tensor gather_output(const at::Tensor& src, const std::optional<at::Tensor>& out_index,
                         const std::optional<at::Tensor>& in_index) {
    std::vector<int64_t> shape(src.sizes().begin(), src.sizes().end());
    if (out_index.has_value()) shape[0] = out_index->size(0);
    if (in_index.has_value()) shape[1] = in_index->size(0);
    return at::empty(shape, src.options());
}

// Fills the descriptor of one job. Returns the tensor whose memory the descriptor reads: src itself,
// or a contiguous copy when its trailing dims cannot be collapsed into RNIP_EXT_MAX_REST_DIMS (a
// pathological layout no model weight has); the caller keeps it alive until the copy is done.
at::Tensor describe_gather(const at::Tensor& src_in, const std::optional<at::Tensor>& out_index,
                           const std::optional<at::Tensor>& in_index, const at::Tensor& out, int32_t job,
                           RnipGatherDesc* d) {
    at::Tensor src = src_in;
    for (int attempt = 0; attempt < 2; ++attempt) {
        std::memset(d, 0, sizeof(RnipGatherDesc));
        d->src = src.const_data_ptr();
        d->dst = out.data_ptr();
        d->job = job;
        d->src_size0 = src.size(0);
        d->src_stride0 = src.stride(0);
        d->n_out = out.size(0);
        if (out_index.has_value()) {
            d->out_index = out_index->const_data_ptr();
            d->out_index_stride = out_index->stride(0);
            d->out_index_is_int32 = out_index->scalar_type() == at::kInt;
        }
        // Without in_index, dim 1 is just another trailing dim: it then merges with the rest, so
        // that pruning only output channels copies whole contiguous slabs.
        int first_rest = 1;
        d->n_in = 1;
        d->src_size1 = 1;
        if (in_index.has_value()) {
            d->in_index = in_index->const_data_ptr();
            d->in_index_stride = in_index->stride(0);
            d->in_index_is_int32 = in_index->scalar_type() == at::kInt;
            d->n_in = in_index->size(0);
            d->src_size1 = src.size(1);
            d->src_stride1 = src.stride(1);
            first_rest = 2;
        }
        const int rest = static_cast<int>(src.dim()) - first_rest;
        const bool fits = rnip_ext_set_rest_dims(d, src.sizes().data() + first_rest, src.strides().data() + first_rest,
                                                 rest);
        if (fits) {
            d->numel = d->n_out * d->n_in * d->inner;
            return src;
        }
        src = src.contiguous();
    }
    TORCH_INTERNAL_ASSERT(false, "a contiguous tensor always collapses to one trailing dim");
    return src;
}

// ---------------------------------------------------------------------------------------------
// CPU kernel

// Output elements per parallel work item: big enough to amortise the job lookup, small enough to
// balance the threads when one huge tensor sits next to many small ones.
constexpr int64_t kChunkBytes = 64 * 1024;

template <typename I>
static inline const I* typed(const void* p) {
    return static_cast<const I*>(p);
}

// Copies `n` elements of the trailing block of one row, starting at element `r` of that block.
template <typename T>
static inline void copy_rest(const RnipGatherDesc& d, const T* row, int64_t r, int64_t n, T* dst) {
    if (d.rest_ndim == 1) {
        const int64_t s = d.rest_strides[0];
        const T* p = row + r * s;
        if (s == 1 && n > 16) {
            std::memcpy(dst, p, static_cast<size_t>(n) * sizeof(T));
        } else if (s == 1) {
            // Short rows (3x3 and 1x1 kernels): an inline loop beats a call into memcpy.
            for (int64_t k = 0; k < n; ++k) dst[k] = p[k];
        } else {
            for (int64_t k = 0; k < n; ++k) dst[k] = p[k * s];
        }
        return;
    }
    // Two or more dims: an odometer over the multi-index, started at r.
    const int nd = d.rest_ndim;
    int64_t idx[RNIP_EXT_MAX_REST_DIMS];
    int64_t offset = 0;
    for (int k = nd - 1; k >= 0; --k) {
        idx[k] = r % d.rest_sizes[k];
        r /= d.rest_sizes[k];
        offset += idx[k] * d.rest_strides[k];
    }
    for (int64_t k = 0; k < n; ++k) {
        dst[k] = row[offset];
        for (int j = nd - 1; j >= 0; --j) {
            offset += d.rest_strides[j];
            if (++idx[j] < d.rest_sizes[j]) break;
            offset -= idx[j] * d.rest_strides[j];
            idx[j] = 0;
        }
    }
}

// One element per (o, i) row (linear weights, BN vectors): a plain gather along dim 1.
template <typename T, typename I>
static inline void gather_scalars(const T* base, const void* in_index, int64_t in_stride, int64_t stride1,
                                  int64_t i0, int64_t n, T* dst) {
    if (in_index == nullptr) {
        for (int64_t k = 0; k < n; ++k) dst[k] = base[(i0 + k) * stride1];
        return;
    }
    const I* idx = typed<I>(in_index) + i0 * in_stride;
    if (in_stride == 1 && stride1 == 1) {
        // The common case (contiguous linear weight, contiguous index): a loop the compiler unrolls.
        for (int64_t k = 0; k < n; ++k) dst[k] = base[idx[k]];
        return;
    }
    for (int64_t k = 0; k < n; ++k) dst[k] = base[static_cast<int64_t>(idx[k * in_stride]) * stride1];
}

// Prefetches [p, p + bytes) into the cache, one line at a time.
static inline void prefetch_span(const void* p, int64_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(c + b);
}

// Copies output elements [begin, end) of one job. With an in_index the reads of one output channel
// hop through its input-channel slab in short pieces (a 1x1 conv reads single elements), which the
// hardware prefetcher follows poorly from DRAM; so the slab of the next kept output channel is
// prefetched while the current one is copied (prefetch_bytes = 0: no prefetch).
template <typename T>
static void copy_range(const RnipGatherDesc& d, int64_t begin, int64_t end, int64_t prefetch_bytes) {
    const T* src = static_cast<const T*>(d.src);
    T* dst = static_cast<T*>(d.dst) + begin;
    int64_t row = begin / d.inner;
    int64_t r = begin - row * d.inner;
    int64_t o = row / d.n_in;
    int64_t i = row - o * d.n_in;
    int64_t left = end - begin;
    while (left > 0) {
        const T* base =
            src + rnip_ext_load_index(d.out_index, d.out_index_is_int32, d.out_index_stride, o) * d.src_stride0;
        if (prefetch_bytes > 0 && o + 1 < d.n_out) {
            const int64_t next = rnip_ext_load_index(d.out_index, d.out_index_is_int32, d.out_index_stride, o + 1);
            prefetch_span(src + next * d.src_stride0, prefetch_bytes);
        }
        if (d.rest_ndim == 0) {
            const int64_t n = std::min(d.n_in - i, left);
            if (d.in_index != nullptr && d.in_index_is_int32) {
                gather_scalars<T, int32_t>(base, d.in_index, d.in_index_stride, d.src_stride1, i, n, dst);
            } else {
                gather_scalars<T, int64_t>(base, d.in_index, d.in_index_stride, d.src_stride1, i, n, dst);
            }
            dst += n;
            left -= n;
        } else {
            for (; i < d.n_in && left > 0; ++i) {
                const T* row_src =
                    base + rnip_ext_load_index(d.in_index, d.in_index_is_int32, d.in_index_stride, i) * d.src_stride1;
                const int64_t n = std::min(d.inner - r, left);
                copy_rest<T>(d, row_src, r, n, dst);
                dst += n;
                left -= n;
                r = 0;
            }
        }
        i = 0;
        ++o;
    }
}

// Bytes of src that one output channel's copy may touch (its dim-1 slab), when prefetching that
// is worthwhile: only with an in_index (without one, rows are long unit-stride runs the hardware
// prefetcher handles) and only for slabs that fit comfortably in L1/L2.
static int64_t prefetch_bytes_of(const RnipGatherDesc& d, int64_t elem_size) {
    constexpr int64_t kMaxPrefetchBytes = 32 * 1024;
    if (d.in_index == nullptr) return 0;
    int64_t extent = (d.src_size1 - 1) * d.src_stride1 + 1;
    for (int k = 0; k < d.rest_ndim; ++k) extent += (d.rest_sizes[k] - 1) * d.rest_strides[k];
    const int64_t bytes = extent * elem_size;
    return bytes <= kMaxPrefetchBytes ? bytes : 0;
}

// complex128 (and any other 16-byte dtype) moves as one opaque 16-byte value.
struct alignas(16) Bytes16 {
    uint64_t lo;
    uint64_t hi;
};

static void copy_range_any(const RnipGatherDesc& d, int64_t elem_size, int64_t begin, int64_t end) {
    const int64_t prefetch = prefetch_bytes_of(d, elem_size);
    switch (elem_size) {
        case 1:
            return copy_range<uint8_t>(d, begin, end, prefetch);
        case 2:
            return copy_range<uint16_t>(d, begin, end, prefetch);
        case 4:
            return copy_range<uint32_t>(d, begin, end, prefetch);
        case 8:
            return copy_range<uint64_t>(d, begin, end, prefetch);
        case 16:
            return copy_range<Bytes16>(d, begin, end, prefetch);
        default:
            TORCH_CHECK(false, "channel_gather: unsupported element size ", elem_size);
    }
}

// Runs every job with a single at::parallel_for over fixed-size chunks of all outputs together.
static void run_cpu_jobs(const std::vector<RnipGatherDesc>& descs, const std::vector<int64_t>& elem_sizes) {
    const size_t n = descs.size();
    std::vector<int64_t> chunk_elems(n);
    std::vector<int64_t> first_chunk(n + 1, 0);
    for (size_t k = 0; k < n; ++k) {
        chunk_elems[k] = std::max<int64_t>(1, kChunkBytes / elem_sizes[k]);
        first_chunk[k + 1] = first_chunk[k] + (descs[k].numel + chunk_elems[k] - 1) / chunk_elems[k];
    }
    const int64_t total = first_chunk[n];
    if (total == 0) return;
    at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
        // Last job whose first chunk is <= begin (jobs without chunks share it with the next one).
        size_t k = static_cast<size_t>(std::upper_bound(first_chunk.begin(), first_chunk.end(), begin) -
                                       first_chunk.begin()) - 1;
        for (int64_t c = begin; c < end; ++c) {
            while (first_chunk[k + 1] <= c) ++k;
            const int64_t lo = (c - first_chunk[k]) * chunk_elems[k];
            const int64_t hi = std::min(lo + chunk_elems[k], descs[k].numel);
            copy_range_any(descs[k], elem_sizes[k], lo, hi);
        }
    });
}

void check_many_lengths(at::TensorList srcs, const c10::List<std::optional<at::Tensor>>& out_indices,
                        const c10::List<std::optional<at::Tensor>>& in_indices) {
    TORCH_CHECK_VALUE(out_indices.size() == srcs.size(), "channel_gather_many: out_indices has ", out_indices.size(),
                      " entries but srcs has ", srcs.size());
    TORCH_CHECK_VALUE(in_indices.size() == srcs.size(), "channel_gather_many: in_indices has ", in_indices.size(),
                      " entries but srcs has ", srcs.size());
    for (size_t k = 1; k < srcs.size(); ++k) {
        TORCH_CHECK_VALUE(srcs[k].device() == srcs[0].device(), "channel_gather_many: srcs[", k, "] is on ",
                          srcs[k].device(), " but srcs[0] is on ", srcs[0].device());
    }
}

static std::vector<at::Tensor> gather_cpu(at::TensorList srcs, const c10::List<std::optional<at::Tensor>>& out_indices,
                                          const c10::List<std::optional<at::Tensor>>& in_indices, bool single) {
    std::vector<at::Tensor> outs;
    std::vector<at::Tensor> keep_alive;
    std::vector<RnipGatherDesc> descs;
    std::vector<int64_t> elem_sizes;
    outs.reserve(srcs.size());
    for (size_t k = 0; k < srcs.size(); ++k) {
        const int64_t job = single ? -1 : static_cast<int64_t>(k);
        const ArgNames names = arg_names(job);
        const at::Tensor& src = srcs[k];
        const std::optional<at::Tensor> out_index = out_indices.get(k);
        const std::optional<at::Tensor> in_index = in_indices.get(k);
        check_gather_args(job, src, out_index, in_index);
        TORCH_CHECK_VALUE(src.device().is_cpu(), names.op, ": ", names.src, " must be a CPU tensor here, got ",
                          src.device());
        if (out_index.has_value()) check_values_cpu(names, names.out_index, *out_index, src.size(0), 0);
        if (in_index.has_value()) check_values_cpu(names, names.in_index, *in_index, src.size(1), 1);
        at::Tensor out = gather_output(src, out_index, in_index);
        outs.push_back(out);
        if (out.numel() == 0) continue;
        RnipGatherDesc d;
        keep_alive.push_back(describe_gather(src, out_index, in_index, out, static_cast<int32_t>(k), &d));
        descs.push_back(d);
        elem_sizes.push_back(static_cast<int64_t>(src.element_size()));
    }
    run_cpu_jobs(descs, elem_sizes);
    return outs;
}

at::Tensor channel_gather_cpu(const at::Tensor& src, const std::optional<at::Tensor>& out_index,
                              const std::optional<at::Tensor>& in_index) {
    c10::List<std::optional<at::Tensor>> outs_list;
    c10::List<std::optional<at::Tensor>> ins_list;
    outs_list.push_back(out_index);
    ins_list.push_back(in_index);
    return gather_cpu({src}, outs_list, ins_list, /*single=*/true)[0];
}

std::vector<at::Tensor> channel_gather_many_cpu(at::TensorList srcs,
                                                const c10::List<std::optional<at::Tensor>>& out_indices,
                                                const c10::List<std::optional<at::Tensor>>& in_indices) {
    check_many_lengths(srcs, out_indices, in_indices);
    return gather_cpu(srcs, out_indices, in_indices, /*single=*/false);
}

}  // namespace detail
}  // namespace rnip_ext

// The only TORCH_LIBRARY block of the namespace: Python code (torch.library.custom_op) adds its own
// "rnip_ext::" ops as fragments, which coexist with this block as long as the names differ.
TORCH_LIBRARY(rnip_ext, m) {
    m.def("channel_gather(Tensor src, Tensor? out_index, Tensor? in_index) -> Tensor",
          {at::Tag::pt2_compliant_tag});
    m.def("channel_gather_many(Tensor[] srcs, Tensor?[] out_indices, Tensor?[] in_indices) -> Tensor[]",
          {at::Tag::pt2_compliant_tag});
}

TORCH_LIBRARY_IMPL(rnip_ext, CPU, m) {
    m.impl("channel_gather", &rnip_ext::detail::channel_gather_cpu);
    m.impl("channel_gather_many", &rnip_ext::detail::channel_gather_many_cpu);
}
