// ONNX Runtime registration of rewrite::LoraDelta and rewrite::LoraDeltaGroup (domain "rewrite", version 1) with the
// lite custom-op API.
//
// Built against the ORT 1.21 headers (ORT_API_VERSION 21); newer runtimes keep serving that API version, so the
// library loads into any onnxruntime >= 1.21 (ONNX.md §7.1). Not linked against libonnxruntime: the API table
// comes from the host at RegisterCustomOps. Only RegisterCustomOps is exported (exports.map).
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#include "onnxruntime_lite_custom_op.h"
#undef ORT_API_MANUAL_INIT

#include <optional>
#include <type_traits>
#include <vector>

#include "lora_delta.h"

namespace rewrite_lora {
namespace {

using Ort::Custom::Tensor;

// Errors are returned as statuses, never thrown across the C boundary into ONNX Runtime.
Ort::Status fail(const std::string& msg, OrtErrorCode code = ORT_INVALID_ARGUMENT) {
  return Ort::Status(msg.c_str(), code);
}

// Shapes, index range and output allocation shared by both execution providers and both bank types (TB = float or
// Ort::Float16_t). Returns "" or the message.
template <typename TB>
std::string prepare(const Tensor<float>& x, const Tensor<TB>& a, const Tensor<TB>& b,
                    const Tensor<int64_t>& idx, const Tensor<float>* base, Tensor<float>& y, Problem& p) {
  const auto& xs = x.Shape();
  const auto& as = a.Shape();
  const auto& bs = b.Shape();
  const auto& is = idx.Shape();
  std::string err = check_shapes(xs.data(), xs.size(), as.data(), as.size(), bs.data(), bs.size(), is.data(),
                                 is.size(), p);
  if (!err.empty()) return err;
  p.idx = idx.Data();  // host memory (CPU EP; for the CUDA EP input 3 is declared OrtMemTypeCPUInput)
  err = check_indices(p.idx, p.nb, p.k);
  if (!err.empty()) return err;
  std::vector<int64_t> ys = xs;
  ys.back() = p.dout;
  if (base != nullptr) {
    if (base->Shape() != ys) return "LoraDelta: base must have the shape of x with the last dim d_out";
    p.base = base->Data();
  }
  p.y = y.Allocate(ys);  // base's own buffer when ORT runs the op in place (kernel_may_inplace below)
  p.x = x.Data();
  p.a = a.Data();
  p.b = b.Data();
  p.half_banks = std::is_same<TB, Ort::Float16_t>::value;
  return "";
}

void ort_parallel_for(void* c, void (*fn)(void*, size_t), size_t total, size_t max_batches, void* data) {
  static_cast<const Ort::KernelContext*>(c)->ParallelFor(fn, total, max_batches, data);
}

using OptionalBase = std::optional<const Tensor<float>*>;

const Tensor<float>* present(const OptionalBase& base) { return base.has_value() ? *base : nullptr; }

// The kernel shared by both execution providers: check and allocate (prepare), skip an empty problem, then
// compute(p, kctx) -> Ort::Status; exceptions become statuses.
template <typename TB, typename Compute>
Ort::Status run_kernel(OrtKernelContext* context, const Tensor<float>& x, const Tensor<TB>& a, const Tensor<TB>& b,
                       const Tensor<int64_t>& idx, const OptionalBase& base, Tensor<float>& y, Compute compute) {
  try {
    Problem p;
    const std::string err = prepare(x, a, b, idx, present(base), y, p);
    if (!err.empty()) return fail(err);
    if (p.n == 0 || p.dout == 0) return Ort::Status{nullptr};
    const Ort::KernelContext kctx(context);
    return compute(p, kctx);
  } catch (const Ort::Exception& e) {
    return fail(e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return fail(std::string("LoraDelta: ") + e.what(), ORT_FAIL);
  }
}

// The CPU kernel on ORT's intra-op thread pool.
Ort::Status run_on_cpu(const Problem& p, const Ort::KernelContext& kctx) {
  Executor ex;
  ex.run = ort_parallel_for;
  ex.ctx = const_cast<Ort::KernelContext*>(&kctx);
  ex.threads = env_threads();
  lora_delta_cpu(p, ex);
  return Ort::Status{nullptr};
}

template <typename TB>
Ort::Status LoraDeltaCpu(OrtKernelContext* context, const Tensor<float>& x, const Tensor<TB>& a, const Tensor<TB>& b,
                         const Tensor<int64_t>& idx, OptionalBase base, Tensor<float>& y) {
  return run_kernel(context, x, a, b, idx, base, y, run_on_cpu);
}

// rewrite::LoraDeltaGroup (CPU): the sites of a `fuse` group, one call. Inputs x, A_bank [K, d_in, sum r_i] (the
// members' A side by side), idx, then base_1 .. base_m and B_1 .. B_m ([K, r_i, d_out_i], the type of A_bank);
// outputs y_i = base_i + (x @ A_bank[k])[:, o_i : o_i + r_i] @ B_i[k], o_i = r_1 + .. + r_(i-1). The variadic part
// is read through the kernel context: the lite API types every variadic input like the first one (a base).
template <typename TB>
Ort::Status LoraDeltaGroupCpu(OrtKernelContext* context, const Tensor<float>& x, const Tensor<TB>& a,
                              const Tensor<int64_t>& idx, const Ort::Custom::Variadic& rest,
                              Ort::Custom::Variadic& ys) {
  try {
    const Ort::KernelContext kctx(context);
    const size_t count = rest.Size();
    if (count == 0 || count % 2 != 0 || kctx.GetOutputCount() != count / 2)
      return fail("LoraDeltaGroup: inputs are x, A_bank, idx, base_1 .. base_m, B_1 .. B_m and outputs y_1 .. "
                  "y_m; got " + std::to_string(count) + " inputs after idx and " +
                  std::to_string(kctx.GetOutputCount()) + " outputs");
    const size_t m = count / 2;
    const auto& xs = x.Shape();
    const auto& as = a.Shape();
    const auto& is = idx.Shape();
    Problem p;
    // x / A_bank / idx are checked as for the single op, with a B_bank [K, r, 0] (the members' are checked below)
    const std::vector<int64_t> whole_b = {as.size() == 3 ? as[0] : 0, as.size() == 3 ? as[2] : 0, 0};
    std::string err = check_shapes(xs.data(), xs.size(), as.data(), as.size(), whole_b.data(), 3, is.data(),
                                   is.size(), p);
    if (!err.empty()) return fail("LoraDeltaGroup" + err.substr(std::string("LoraDelta").size()));
    p.idx = idx.Data();
    err = check_indices(p.idx, p.nb, p.k);
    if (!err.empty()) return fail(err);
    p.x = x.Data();
    p.a = a.Data();
    p.half_banks = std::is_same<TB, Ort::Float16_t>::value;
    const ONNXTensorElementDataType bank_type = p.half_banks ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16
                                                             : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    thread_local std::vector<Member> members;
    members.assign(m, Member{});
    int64_t off = 0;
    for (size_t i = 0; i < m; ++i) {
      const Ort::ConstValue base = kctx.GetInput(3 + i), b = kctx.GetInput(3 + m + i);
      const auto base_info = base.GetTensorTypeAndShapeInfo(), b_info = b.GetTensorTypeAndShapeInfo();
      if (base_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || b_info.GetElementType() != bank_type)
        return fail("LoraDeltaGroup: member " + std::to_string(i) + ": base must be float32 and B_bank the type "
                    "of A_bank");
      const std::vector<int64_t> ys_shape = base_info.GetShape(), bs = b_info.GetShape();
      err = check_member(bs.data(), bs.size(), ys_shape.data(), ys_shape.size(), xs.data(), xs.size(), p.k, i);
      if (!err.empty()) return fail(err);
      Member& o = members[i];
      o.b = b.GetTensorRawData();
      o.base = base.GetTensorData<float>();
      o.off = off;
      o.r = bs[1];
      o.dout = bs[2];
      o.y = kctx.GetOutput(i, ys_shape).GetTensorMutableData<float>();
      off += o.r;
    }
    if (off != p.r)
      return fail("LoraDeltaGroup: the members' ranks add up to " + std::to_string(off) + ", A_bank's is " +
                  std::to_string(p.r));
    p.members = members.data();
    p.n_members = static_cast<int64_t>(m);
    return run_on_cpu(p, kctx);
  } catch (const Ort::Exception& e) {
    return fail(e.what(), e.GetOrtErrorCode());
  } catch (const std::exception& e) {
    return fail(std::string("LoraDeltaGroup: ") + e.what(), ORT_FAIL);
  }
}

#ifdef REWRITE_LORA_CUDA
template <typename TB>
Ort::Status LoraDeltaCuda(OrtKernelContext* context, const Tensor<float>& x, const Tensor<TB>& a, const Tensor<TB>& b,
                          const Tensor<int64_t>& idx, OptionalBase base, Tensor<float>& y) {
  return run_kernel(context, x, a, b, idx, base, y, [](const Problem& p, const Ort::KernelContext& kctx) {
    const std::string err = lora_delta_cuda(p, kctx.GetGPUComputeStream());
    return err.empty() ? Ort::Status{nullptr} : fail(err, ORT_RUNTIME_EXCEPTION);
  });
}
#endif

Ort::Status infer_shape(Ort::ShapeInferContext& ctx) {
  // y = x.shape[:-1] + [B_bank.shape[2]]
  try {
    Ort::ShapeInferContext::Shape s = ctx.GetInputShape(0);
    const auto& bs = ctx.GetInputShape(2);
    if (s.empty() || bs.size() != 3) return Ort::Status{nullptr};
    s.back() = bs[2];
    return ctx.SetOutputShape(0, s);
  } catch (const Ort::Exception& e) {
    return fail(e.what(), e.GetOrtErrorCode());
  }
}

Ort::Status infer_group_shapes(Ort::ShapeInferContext& ctx) {
  // y_i = base_i's shape (inputs x, A_bank, idx, base_1 .. base_m, B_1 .. B_m)
  try {
    const size_t m = (ctx.GetInputCount() - 3) / 2;
    for (size_t i = 0; i < m; ++i) {
      Ort::Status st = ctx.SetOutputShape(i, ctx.GetInputShape(3 + i));
      if (!st.IsOK()) return st;
    }
    return Ort::Status{nullptr};
  } catch (const Ort::Exception& e) {
    return fail(e.what(), e.GetOrtErrorCode());
  }
}

// y may reuse base's buffer (input 4 -> output 0): ORT decides, when base has no other consumer.
size_t ORT_API_CALL kernel_may_inplace(int** input_index, int** output_index) {
  *input_index = new int[1]{4};
  *output_index = new int[1]{0};
  return 1;
}
void ORT_API_CALL release_may_inplace(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

// LoraDeltaGroup: y_i may reuse base_i's buffer (input 3 + i -> output i). The pairs are fixed indices, declared for
// up to kGroupInPlace members; ONNX Runtime skips a pair whose output the node does not have (bounds-checked in its
// allocation planner), and members beyond the pairs get a copy of their base.
constexpr int kGroupInPlace = 16;
size_t ORT_API_CALL group_may_inplace(int** input_index, int** output_index) {
  *input_index = new int[kGroupInPlace];
  *output_index = new int[kGroupInPlace];
  for (int i = 0; i < kGroupInPlace; ++i) {
    (*input_index)[i] = 3 + i;
    (*output_index)[i] = i;
  }
  return kGroupInPlace;
}

Ort::Custom::OrtLiteCustomOp* in_place(Ort::Custom::OrtLiteCustomOp* op) {  // (y may reuse input 4, base)
  op->GetMayInplace = kernel_may_inplace;
  op->ReleaseMayInplace = release_may_inplace;
  return op;
}

struct Registry {
  Ort::CustomOpDomain domain{"rewrite"};
  std::vector<Ort::Custom::OrtLiteCustomOp*> ops;  // never freed (see registry())
};

Registry& registry() {
  // Domain and ops must outlive every session that uses them: static storage, never freed. One kernel per bank type
  // (float32 / float16) and execution provider; ONNX Runtime picks by the type of A_bank / B_bank.
  static Registry* r = [] {
    auto* reg = new Registry;
    auto add = [reg](Ort::Custom::OrtLiteCustomOp* op) {
      reg->domain.Add(in_place(op));
      reg->ops.push_back(op);
    };
    add(Ort::Custom::CreateLiteCustomOp("LoraDelta", "CPUExecutionProvider", LoraDeltaCpu<float>, infer_shape));
    add(Ort::Custom::CreateLiteCustomOp("LoraDelta", "CPUExecutionProvider", LoraDeltaCpu<Ort::Float16_t>,
                                        infer_shape));
    // the grouped op runs on the CPU EP only (on a CUDA session ONNX Runtime places it on the CPU EP)
    auto add_plain = [reg](Ort::Custom::OrtLiteCustomOp* op) {
      // the lite API leaves a variadic output's type open, which ONNX Runtime's type inference rejects: float32
      op->GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
      op->GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
      op->GetMayInplace = group_may_inplace;
      op->ReleaseMayInplace = release_may_inplace;
      reg->domain.Add(op);
      reg->ops.push_back(op);
    };
    add_plain(Ort::Custom::CreateLiteCustomOp("LoraDeltaGroup", "CPUExecutionProvider", LoraDeltaGroupCpu<float>,
                                              infer_group_shapes));
    add_plain(Ort::Custom::CreateLiteCustomOp("LoraDeltaGroup", "CPUExecutionProvider",
                                              LoraDeltaGroupCpu<Ort::Float16_t>, infer_group_shapes));
#ifdef REWRITE_LORA_CUDA
    // The adapter ids are routing decisions made on the host: take them in host memory so the op can check them
    // (clean error) and plan without a device->host copy or a stream synchronisation.
    auto ids_on_host = [](Ort::Custom::OrtLiteCustomOp* op) {
      op->GetInputMemoryType = [](const OrtCustomOp*, size_t i) {
        return i == 3 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
      };
      return op;
    };
    add(ids_on_host(
        Ort::Custom::CreateLiteCustomOp("LoraDelta", "CUDAExecutionProvider", LoraDeltaCuda<float>, infer_shape)));
    add(ids_on_host(Ort::Custom::CreateLiteCustomOp("LoraDelta", "CUDAExecutionProvider",
                                                    LoraDeltaCuda<Ort::Float16_t>, infer_shape)));
#endif
    return reg;
  }();
  return *r;
}

}  // namespace
}  // namespace rewrite_lora

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)  // the runtime is older than the headers (1.21): report through the oldest API table
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "rewrite LoraDelta needs onnxruntime >= 1.21");
  Ort::InitApi(api);
  try {
    Ort::UnownedSessionOptions(options).Add(rewrite_lora::registry().domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
