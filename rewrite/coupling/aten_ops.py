"""The aten ops the channel-label tracer (`rewrite.coupling.labels`) knows, one table per rule it applies:

    IDENTITY          the output carries its input's labels unchanged (copies, casts, dropout)
    RESHAPES          the reshapes among MOVES: a labelled dim split into several ties the inner dims to the outer one
    MOVES             movement (RESHAPES, transpose, slice, split, ...): the same op on the labels
    JOINS             cat / stack: the same op on the labels of the parts (an unlabelled part reads -1)
    ELEMENTWISE       labels of aligned elements are tied; an unlabelled operand varying along a labelled dim pins it
    SUMS              reductions that pin nothing (a zero channel adds nothing)
    REDUCTIONS        reductions that pin a labelled dim they reduce over (removal would change the statistic)
    ALONG             ops that run along one dim (softmax, cumsum): it is pinned, the labels pass through
    MATMULS           contracted dims of both operands tied, batch dims too (mm / matmul of a parameter: a weight op)
    CONVS             conv op -> the index of its `groups` argument (depthwise: input tied to output channels; other
                      grouped convs are blocked)
    BATCH_NORMS       the channel dim is tied to the elements of weight, bias and running statistics
    QUIET             read labelled tensors, produce none (neither blocked nor labelled)
    FOLLOW_TO_WEIGHT  transposes and casts walked back through from a weight op's operand to the parameter it reads
"""
import torch

aten = torch.ops.aten

IDENTITY = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
            aten.lift_fresh_copy.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
            aten.dropout.default, aten.feature_dropout.default, aten.type_as.default}
RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
            aten.unflatten.int}
MOVES = RESHAPES | {aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default,
                    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor, aten.select.int,
                    aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
                    aten.narrow.default, aten.movedim.int}
JOINS = {aten.cat.default, aten.stack.default}
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.div.Tensor_mode, aten.rsub.Scalar,
    aten.add.Scalar, aten.mul.Scalar, aten.sub.Scalar, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
    aten.maximum.default, aten.minimum.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.relu.default, aten.gelu.default, aten.silu.default,
    aten.tanh.default, aten.sigmoid.default, aten.neg.default, aten.exp.default, aten.rsqrt.default,
    aten.sqrt.default, aten.abs.default, aten.hardtanh.default, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.erf.default, aten.log.default, aten.softplus.default, aten.leaky_relu.default,
    aten.elu.default, aten.hardswish.default, aten.hardsigmoid.default, aten.mish.default, aten.sin.default,
    aten.cos.default, aten.reciprocal.default, aten.relu6.default, aten.square.default,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar, aten.gt.Scalar, aten.le.Scalar,
    aten.ge.Scalar, aten.logical_not.default}
SUMS = {aten.sum.dim_IntList, aten.sum.default}
REDUCTIONS = {aten.mean.dim, aten.mean.default, aten.amax.default, aten.amin.default, aten.var.correction,
              aten.var.dim, aten.std.correction, aten.logsumexp.default, aten.linalg_vector_norm.default,
              aten.norm.ScalarOpt_dim}
ALONG = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
         aten.cumsum.default}
MATMULS = {aten.matmul.default, aten.bmm.default, aten.mm.default}
CONVS = {aten.conv1d.default: 6, aten.conv2d.default: 6, aten.conv3d.default: 6}
BATCH_NORMS = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}
QUIET = {aten.sym_size.int, aten._assert_tensor_metadata.default}
FOLLOW_TO_WEIGHT = {aten.t.default, aten.transpose.int, aten.permute.default, aten._to_copy.default, aten.to.dtype,
                    aten.alias.default, aten.detach.default, aten.contiguous.default}
