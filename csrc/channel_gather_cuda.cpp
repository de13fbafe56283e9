// CUDA binding of the channel-gather ops: host-side checks, descriptors, one launch per element size.
//
// The kernel (channel_gather_kernel.cu) is torch-free; this file turns tensors into RnipGatherDesc
// descriptors. Jobs are grouped by element size (1/2/4/8/16 bytes); each group goes to the kernel
// RNIP_EXT_GATHER_BATCH descriptors per launch, by value: no device table, no pinned staging
// buffer, no host-to-device copy and no host synchronisation, so a call can be captured in a CUDA
// graph (pruning a model of ~200 weights: ~14 launches).
//
// Index values are validated on the device: the kernel checks each value it reads and fails a
// device assertion on one out of range (the behaviour of index_select's), before any
// out-of-bounds read. A clean Python ValueError instead comes from
// rnip_ext.ops.channel_gather(check_values=True), at the price of one synchronisation per call.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <vector>

#include "channel_gather_kernel.h"

namespace rnip_ext {
namespace detail {

// Shared with the CPU kernel; defined in channel_gather.cpp, linked into the same library.
void check_gather_args(int64_t job, const at::Tensor& src, const std::optional<at::Tensor>& out_index,
                       const std::optional<at::Tensor>& in_index);
void check_many_lengths(at::TensorList srcs, const c10::List<std::optional<at::Tensor>>& out_indices,
                        const c10::List<std::optional<at::Tensor>>& in_indices);
at::Tensor gather_output(const at::Tensor& src, const std::optional<at::Tensor>& out_index,
                         const std::optional<at::Tensor>& in_index);
at::Tensor describe_gather(const at::Tensor& src_in, const std::optional<at::Tensor>& out_index,
                           const std::optional<at::Tensor>& in_index, const at::Tensor& out, int32_t job,
                           RnipGatherDesc* d);

namespace {

constexpr std::array<int64_t, 5> kElemSizes = {1, 2, 4, 8, 16};

std::vector<at::Tensor> gather_cuda(at::TensorList srcs, const c10::List<std::optional<at::Tensor>>& out_indices,
                                    const c10::List<std::optional<at::Tensor>>& in_indices, bool single) {
    std::vector<at::Tensor> outs;
    outs.reserve(srcs.size());
    if (srcs.empty()) return outs;
    const c10::cuda::CUDAGuard guard(srcs[0].device());

    // Descriptors point into these tensors; a src with an odd layout is replaced by a contiguous
    // copy. Freeing them at the end of this function is safe: the caching allocator only reuses
    // their memory for work queued later on the same stream.
    std::vector<at::Tensor> keep_alive;
    std::array<std::vector<RnipGatherDesc>, kElemSizes.size()> by_size;
    for (size_t k = 0; k < srcs.size(); ++k) {
        const int64_t job = single ? -1 : static_cast<int64_t>(k);
        const at::Tensor& src = srcs[k];
        const std::optional<at::Tensor> out_index = out_indices.get(k);
        const std::optional<at::Tensor> in_index = in_indices.get(k);
        check_gather_args(job, src, out_index, in_index);
        const std::string src_name =
            single ? std::string("channel_gather: src") : "channel_gather_many: srcs[" + std::to_string(k) + "]";
        TORCH_CHECK_VALUE(src.is_cuda(), src_name, " must be a CUDA tensor here, got ", src.device());
        at::Tensor out = gather_output(src, out_index, in_index);
        outs.push_back(out);
        if (out.numel() == 0) continue;
        const int64_t elem_size = static_cast<int64_t>(src.element_size());
        size_t cls = 0;
        while (cls < kElemSizes.size() && kElemSizes[cls] != elem_size) ++cls;
        TORCH_CHECK(cls < kElemSizes.size(), "channel_gather: unsupported element size ", elem_size, " of dtype ",
                    src.scalar_type());
        RnipGatherDesc d;
        keep_alive.push_back(describe_gather(src, out_index, in_index, out, static_cast<int32_t>(k), &d));
        by_size[cls].push_back(d);
    }

    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(srcs[0].device().index()).stream();
    for (size_t cls = 0; cls < kElemSizes.size(); ++cls) {
        const auto& descs = by_size[cls];
        if (descs.empty()) continue;
        C10_CUDA_CHECK(rnip_ext_launch_channel_gather(descs.data(), static_cast<int>(descs.size()),
                                                      static_cast<int>(kElemSizes[cls]), stream));
    }
    return outs;
}

at::Tensor channel_gather_cuda(const at::Tensor& src, const std::optional<at::Tensor>& out_index,
                               const std::optional<at::Tensor>& in_index) {
    c10::List<std::optional<at::Tensor>> out_list;
    c10::List<std::optional<at::Tensor>> in_list;
    out_list.push_back(out_index);
    in_list.push_back(in_index);
    return gather_cuda({src}, out_list, in_list, /*single=*/true)[0];
}

std::vector<at::Tensor> channel_gather_many_cuda(at::TensorList srcs,
                                                 const c10::List<std::optional<at::Tensor>>& out_indices,
                                                 const c10::List<std::optional<at::Tensor>>& in_indices) {
    check_many_lengths(srcs, out_indices, in_indices);
    return gather_cuda(srcs, out_indices, in_indices, /*single=*/false);
}

}  // namespace
}  // namespace detail
}  // namespace rnip_ext

TORCH_LIBRARY_IMPL(rnip_ext, CUDA, m) {
    m.impl("channel_gather", &rnip_ext::detail::channel_gather_cuda);
    m.impl("channel_gather_many", &rnip_ext::detail::channel_gather_many_cuda);
}
