"""Fused bidirectional attention for BERT (FlashAttention-2 style), forward and backward, in Triton.

Layout. q, k, v are `[batch, seqlen, heads, head_dim]` (padded) or `[total_tokens, heads, head_dim]` (varlen),
with ANY strides over the leading dims (the model passes views of one fused QKV projection output,
`[B, S, 3, H, D]` unbound), as long as head_dim is contiguous. The kernels take the strides explicitly.

Sequences. Every kernel runs one program per (row block, batch * head) and reads its sequence's extent from
`SEQ`:
  * varlen (IS_VARLEN): SEQ = cu_seqlens, the sequence is rows cu[b] .. cu[b+1] of the token dimension.
  * padded: SEQ = per-sequence "extent" = 1 + index of the last real token (0 for an all-padding sequence),
    rows 0 .. extent of the sequence; rows past the extent are padding and are written as zeros. Inside the
    extent the key padding mask itself (HAS_MASK) is applied, so masks with holes are also exact.
Key blocks past the extent are never loaded, so a 60%-full padded batch costs ~0.36x the work of a full one.

Math (per sequence and head, scale c = softmax_scale, keep mask Z with P(Z=1) = 1 - p, r = 1 / (1 - p)):
  forward:   S = c Q K^T (masked keys -> -inf), P = softmax(S), O = (P * Z * r) V, LSE = logsumexp(S)
             computed block by block with the online softmax; nothing of size seqlen x seqlen is stored.
  backward:  recompute P = exp(S - LSE); Pd = P * Z * r
             dV = Pd^T dO;  dP = (dO V^T) * Z * r;  Delta = rowsum(dO * O) (= rowsum(dP * P));
             dS = P * (dP - Delta);  dQ = c dS K;  dK = c dS^T Q
  dK/dV iterate over query blocks per key block, dQ over key blocks per query block (two kernels, no atomics).
Padded query rows (and query rows masked out) get LSE = +inf so that P = 0 there in the backward: their
output is zero, hence they receive and pass on no gradient.

Dropout. The keep mask is never stored: it is regenerated from Philox(seed, counter) with the counter
(q * max_seqlen + k, batch * heads + head) identifying each (batch*head, query, key) uniquely, in the forward
and again in both backward kernels. `dropout_keep_mask` returns that same mask densely for tests.

Precision. Dot products in the input dtype with float32 accumulation; the softmax statistics, LSE and Delta
are float32. For float32 inputs on a GPU, `tl.dot` uses TF32 (10-bit mantissa) tensor cores exactly when torch's
own float32 matmuls do (`dot_precision`: torch.get_float32_matmul_precision() != "highest", i.e.
`torch.backends.cuda.matmul.allow_tf32`; expect ~1e-3 relative error), and full fp32 FMA otherwise. Under
TRITON_INTERPRET=1 (CPU) float32 dots are exact either way.
"""
from __future__ import annotations

import itertools
import math

import torch
import triton
import triton.language as tl

from bertfast.kernels import _launch

# log2(e): the kernels' softmax runs in base 2, exp(x) = exp2(x * LOG2E) (a constexpr: jit code reads no plain globals)
LOG2E = tl.constexpr(1.4426950408889634)


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _dropout_keep(seed, bh, rows, cols, max_seqlen, dropout_p):
    """Keep mask (True = kept, probability 1 - dropout_p) for the tile rows x cols (they broadcast).

    The Philox counter is (rows * max_seqlen + cols, bh, 0, 0): unique per (batch*head, query, key) for
    max_seqlen < 65536. Shared by every kernel, so forward and backward see the same mask."""
    c0 = (rows * max_seqlen + cols).to(tl.uint32)
    zero = c0 * 0
    c1 = zero + bh.to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, zero, zero)
    return tl.uint_to_uniform_float(r) > dropout_p


@triton.jit
def _seq_extent(SEQ, b, IS_VARLEN: tl.constexpr):
    """(first token row, number of rows) of sequence b."""
    if IS_VARLEN:
        start = tl.load(SEQ + b)
        seqlen = tl.load(SEQ + b + 1) - start
    else:
        start = b * 0
        seqlen = tl.load(SEQ + b)
    return start, seqlen


@triton.jit
def _block_and_head(max_seqlen, BLOCK: tl.constexpr):
    """(row block, batch * head) of this program. The grid is one axis of cdiv(max_seqlen, BLOCK) * batch * heads
    programs, row blocks fastest (programs of one head run together and share its K/V in L2): CUDA allows
    2**31 - 1 programs on axis 0 but only 65535 on axes 1 and 2, which batch * heads passes at BERT-base
    eval batches of 5462 (see `launch_grid`)."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(max_seqlen, BLOCK)
    return pid % n_blocks, pid // n_blocks


@triton.jit
def _prologue(SEQ, n_heads, max_seqlen, BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Where every attention program starts: (pid, bh, b64, h, start64, seqlen, row_limit).

    pid: its block of BLOCK rows (query rows, or key rows for dK/dV); bh = b * n_heads + h; start64: the row of
    sequence b's first token (int64: the token dimension times its stride can pass int32 on big batches);
    seqlen: its length; row_limit: the rows the program may write, the sequence's own in varlen (rows past it
    belong to the next sequence) and all max_seqlen padded (padded rows are written, as zeros). In varlen a
    program with pid * BLOCK >= seqlen has nothing to do; the caller returns (a helper cannot)."""
    pid, bh = _block_and_head(max_seqlen, BLOCK)
    b = bh // n_heads
    h = bh % n_heads
    start, seqlen = _seq_extent(SEQ, b, IS_VARLEN)
    if IS_VARLEN:
        row_limit = seqlen
    else:
        row_limit = seqlen * 0 + max_seqlen
    return pid, bh, b.to(tl.int64), h, start.to(tl.int64), seqlen, row_limit


@triton.jit
def _row0(PTR, b64, start64, h, stride_b, stride_s, stride_h):
    """Pointer to head h of sequence b's first row in a [batch, seqlen, heads, ...] / [tokens, heads, ...] tensor."""
    return PTR + b64 * stride_b + start64 * stride_s + h * stride_h


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,          # inputs, rows (token dim) x heads x head_dim, strides below, head_dim contiguous
    O,                # output, same shape as Q
    LSE,              # float32 log-sum-exp (natural log) per (batch, head, row); +inf at padded/masked rows
    MASK,             # uint8 key padding mask [batch, max_seqlen] (1 = real token); read only if HAS_MASK
    SEQ,              # int32: cu_seqlens [batch + 1] (varlen) or extents [batch] (padded)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,   # LSE strides over batch and head (row stride is 1)
    stride_mb,
    n_heads, max_seqlen,
    sm_scale, dropout_p, SEED,   # SEED: *int64 (0-dim) Philox seed, read on the device (CUDA-graph safe)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # tl.dot's for float32 operands: "tf32" or "ieee" (see dot_precision)
):
    pid_m, bh, b64, h, start64, seqlen, row_limit = _prologue(SEQ, n_heads, max_seqlen, BLOCK_M, IS_VARLEN)
    if IS_VARLEN:
        if pid_m * BLOCK_M >= seqlen:
            return
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    q_base = _row0(Q, b64, start64, h, stride_qb, stride_qs, stride_qh)
    k_base = _row0(K, b64, start64, h, stride_kb, stride_ks, stride_kh)
    v_base = _row0(V, b64, start64, h, stride_vb, stride_vs, stride_vh)
    o_base = _row0(O, b64, start64, h, stride_ob, stride_os, stride_oh)
    l_base = LSE + b64 * stride_lb + h * stride_lh + start64

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seqlen
    q_ok = row_ok
    if HAS_MASK:
        q_ok = q_ok & (tl.load(MASK + b64 * stride_mb + offs_m, mask=row_ok, other=0) != 0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if pid_m * BLOCK_M < seqlen:
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qk_scale = sm_scale * LOG2E  # softmax in base 2: exp(x) = exp2(x * log2(e))
        for start_n in range(0, seqlen, BLOCK_N):
            cols = start_n + offs_n
            col_ok = cols < seqlen
            if HAS_MASK:
                col_ok = col_ok & (tl.load(MASK + b64 * stride_mb + cols, mask=col_ok, other=0) != 0)
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :],
                        mask=(cols < seqlen)[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: avoid -inf - -inf
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m[:, None], cols[None, :], max_seqlen, dropout_p)
                p = tl.where(keep, p, 0.0)  # the 1 / (1 - p) rescale is applied once at the end
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                        mask=(cols < seqlen)[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
            m_i = m_new

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out_scale = 1.0 / l_safe
    if HAS_DROPOUT:
        out_scale = out_scale / (1.0 - dropout_p)
    acc = acc * out_scale[:, None]
    acc = tl.where(q_ok[:, None], acc, 0.0)
    lse = tl.where(q_ok, (m_i + tl.math.log2(l_safe)) / LOG2E, float("inf"))
    out_rows = offs_m < row_limit
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], acc.to(O.dtype.element_ty),
             mask=out_rows[:, None] & d_ok[None, :])
    tl.store(l_base + offs_m, lse, mask=out_rows)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O,                # forward output
    DO,               # gradient of the output
    DELTA,            # float32 rowsum(dO * O), same layout as LSE
    SEQ,              # as in the forward
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,
    n_heads, max_seqlen,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    pid_m, bh, b64, h, start64, seqlen, row_limit = _prologue(SEQ, n_heads, max_seqlen, BLOCK_M, IS_VARLEN)
    if pid_m * BLOCK_M >= seqlen:  # Delta only at real rows, padded or varlen
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o_base = _row0(O, b64, start64, h, stride_ob, stride_os, stride_oh)
    do_base = _row0(DO, b64, start64, h, stride_dob, stride_dos, stride_doh)
    o = tl.load(o_base + offs_m[:, None] * stride_os + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
    do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=msk, other=0.0).to(tl.float32)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + start64 + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,          # forward inputs
    DO,               # gradient of the output
    DK, DV,           # outputs: gradients of k and v (same strides as each other)
    LSE, DELTA,       # float32 per-row statistics from the forward / the preprocess
    MASK, SEQ,        # as in the forward
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_lb, stride_lh,
    stride_mb,
    n_heads, max_seqlen,
    sm_scale, dropout_p, SEED,   # SEED: *int64 (0-dim) Philox seed, read on the device (CUDA-graph safe)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # tl.dot's for float32 operands: "tf32" or "ieee" (see dot_precision)
):
    # one program per block of BLOCK_N keys; it streams over all query blocks (the transposed tiles, [N, M])
    pid_n, bh, b64, h, start64, seqlen, row_limit = _prologue(SEQ, n_heads, max_seqlen, BLOCK_N, IS_VARLEN)
    if IS_VARLEN:
        if pid_n * BLOCK_N >= seqlen:
            return
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    q_base = _row0(Q, b64, start64, h, stride_qb, stride_qs, stride_qh)
    k_base = _row0(K, b64, start64, h, stride_kb, stride_ks, stride_kh)
    v_base = _row0(V, b64, start64, h, stride_vb, stride_vs, stride_vh)
    do_base = _row0(DO, b64, start64, h, stride_dob, stride_dos, stride_doh)
    dk_base = _row0(DK, b64, start64, h, stride_dkb, stride_dks, stride_dkh)
    dv_base = _row0(DV, b64, start64, h, stride_dkb, stride_dks, stride_dkh)
    l_base = LSE + b64 * stride_lb + h * stride_lh + start64
    d_base = DELTA + b64 * stride_lb + h * stride_lh + start64

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    key_in = offs_n < seqlen
    col_ok = key_in
    if HAS_MASK:
        col_ok = col_ok & (tl.load(MASK + b64 * stride_mb + offs_n, mask=key_in, other=0) != 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if pid_n * BLOCK_N < seqlen:
        kv_msk = key_in[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_msk, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_msk, other=0.0)
        qk_scale = sm_scale * LOG2E
        for start_m in range(0, seqlen, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < seqlen
            qd_msk = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=qd_msk, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :], mask=qd_msk, other=0.0)
            lse = tl.load(l_base + rows, mask=row_ok, other=float("inf")) * LOG2E
            delta = tl.load(d_base + rows, mask=row_ok, other=0.0)
            # S^T [BLOCK_N, BLOCK_M], base 2
            s_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
            p_t = tl.math.exp2(s_t - lse[None, :])                  # P^T; 0 at padded query rows (LSE=inf)
            p_t = tl.where(col_ok[:, None], p_t, 0.0)               # masked keys
            dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (dO V^T)^T
            if HAS_DROPOUT:
                keep_t = _dropout_keep(seed, bh, rows[None, :], offs_n[:, None], max_seqlen, dropout_p)
                rescale = 1.0 / (1.0 - dropout_p)
                pd_t = tl.where(keep_t, p_t * rescale, 0.0)
                dp_t = tl.where(keep_t, dp_t * rescale, 0.0)
            else:
                pd_t = p_t
            dv = tl.dot(pd_t.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)  # dV += Pd^T dO
            ds_t = p_t * (dp_t - delta[None, :])                    # dS^T = P^T * (dP^T - Delta)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)  # dK += dS^T Q  (times c below)
    dk = dk * sm_scale
    out_msk = (offs_n < row_limit)[:, None] & d_ok[None, :]
    tl.store(dk_base + offs_n[:, None] * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=out_msk)
    tl.store(dv_base + offs_n[:, None] * stride_dks + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_msk)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V,          # forward inputs
    DO,               # gradient of the output
    DQ,               # output: gradient of q
    LSE, DELTA,       # float32 per-row statistics
    MASK, SEQ,        # as in the forward
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    stride_mb,
    n_heads, max_seqlen,
    sm_scale, dropout_p, SEED,   # SEED: *int64 (0-dim) Philox seed, read on the device (CUDA-graph safe)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # tl.dot's for float32 operands: "tf32" or "ieee" (see dot_precision)
):
    # one program per block of BLOCK_M queries; it streams over all key blocks
    pid_m, bh, b64, h, start64, seqlen, row_limit = _prologue(SEQ, n_heads, max_seqlen, BLOCK_M, IS_VARLEN)
    if IS_VARLEN:
        if pid_m * BLOCK_M >= seqlen:
            return
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    q_base = _row0(Q, b64, start64, h, stride_qb, stride_qs, stride_qh)
    k_base = _row0(K, b64, start64, h, stride_kb, stride_ks, stride_kh)
    v_base = _row0(V, b64, start64, h, stride_vb, stride_vs, stride_vh)
    do_base = _row0(DO, b64, start64, h, stride_dob, stride_dos, stride_doh)
    dq_base = _row0(DQ, b64, start64, h, stride_dqb, stride_dqs, stride_dqh)
    l_base = LSE + b64 * stride_lb + h * stride_lh + start64
    d_base = DELTA + b64 * stride_lb + h * stride_lh + start64

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seqlen

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if pid_m * BLOCK_M < seqlen:
        qd_msk = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qd_msk, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=qd_msk, other=0.0)
        lse = tl.load(l_base + offs_m, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(d_base + offs_m, mask=row_ok, other=0.0)
        qk_scale = sm_scale * LOG2E
        for start_n in range(0, seqlen, BLOCK_N):
            cols = start_n + offs_n
            key_in = cols < seqlen
            col_ok = key_in
            if HAS_MASK:
                col_ok = col_ok & (tl.load(MASK + b64 * stride_mb + cols, mask=key_in, other=0) != 0)
            kv_msk = key_in[:, None] & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_msk, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_msk, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(col_ok[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
            if HAS_DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m[:, None], cols[None, :], max_seqlen, dropout_p)
                dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
            ds = p * (dp - delta[:, None])                          # dS = P * (dP - Delta)
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)  # dQ += dS K  (times c below)
    dq = dq * sm_scale
    tl.store(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=(offs_m < row_limit)[:, None] & d_ok[None, :])


@triton.jit
def _zero_tail_kernel(
    PTR,              # a [rows, A, B] tensor (any strides): out [T, H, D], lse [H, T] seen as [T, H, 1], dqkv
    SEQ,              # int32 cu_seqlens [batch + 1]: rows >= SEQ[n_seqs] are padding
    n_seqs, n_rows, A, B,
    stride_t, stride_a, stride_b,
    value,            # what a padding row holds (0.0; +inf for lse)
    BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Writes `value` into every row t >= cu_seqlens[-1] of PTR (the padding rows of a bucket-padded varlen
    batch, issue 31); programs whose row block lies below cu_seqlens[-1] return at once. Grid: (row blocks,
    column blocks of the A * B columns)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    end = tl.load(SEQ + n_seqs)
    if tl.program_id(0) * BLOCK_T + BLOCK_T <= end:
        return
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    col_off = (w // B).to(tl.int64) * stride_a + (w % B).to(tl.int64) * stride_b
    msk = ((rows >= end) & (rows < n_rows))[:, None] & (w < A * B)[None, :]
    vals = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32) + value
    tl.store(PTR + rows.to(tl.int64)[:, None] * stride_t + col_off[None, :], vals.to(PTR.dtype.element_ty), mask=msk)


@triton.jit
def _dropout_mask_kernel(
    OUT,              # uint8 [batch * heads, max_seqlen, max_seqlen], 1 = kept
    max_seqlen, dropout_p, SEED,
    BLOCK: tl.constexpr,
):
    pid_m, bh = _block_and_head(max_seqlen, BLOCK)
    pid_n = tl.program_id(1)
    seed = tl.load(SEED)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], max_seqlen, dropout_p)
    msk = (rows < max_seqlen)[:, None] & (cols < max_seqlen)[None, :]
    base = OUT + bh.to(tl.int64) * max_seqlen * max_seqlen
    tl.store(base + rows[:, None] * max_seqlen + cols[None, :], keep.to(tl.uint8), mask=msk)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------

KINDS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")


def attention_config(kind: str, head_dim: int, dtype: torch.dtype, capability: int | None,
                     precision: str = "tf32") -> dict:
    """Block sizes and launch settings for one attention kernel.

    kind: one of KINDS. capability: 80, 90, ... (major * 10 + minor) of the CUDA device, or None for the
    CPU interpreter. precision: the float32 dots' input precision (`dot_precision`); "ieee" float32 dots run on
    FMA units with both operands in registers, so they get smaller tiles. Returns {"BLOCK_M", "BLOCK_N",
    "BLOCK_D", "num_warps", "num_stages"}; BLOCK_M is the query-block size, BLOCK_N the key-block size, for
    every kind.

    Chosen from the shared-memory budget (sm_80: 163 KB, sm_90: 227 KB per block) and checked to compile
    without register spills (ptxas -v) for head_dim 32/64/128 and fp16/bf16/fp32; not yet tuned on a GPU.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if head_dim > 256:
        raise ValueError(f"head_dim={head_dim} is not supported (at most 256)")
    block_d = max(16, triton.next_power_of_2(head_dim))
    if capability is None:
        # interpreter: fewer, larger programs run faster; sizes are not multiples of typical seqlens
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 1}
    wide = dtype == torch.float32   # 4-byte operands: half the tile for the same shared memory
    big_d = block_d >= 128
    if kind == "bwd_preprocess":
        # fp32 d128 over 4 warps spills 4 B on sm_80 under triton 3.6 (the GPU machine's release): 8 warps there
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": block_d, "num_warps": 8 if (wide and big_d) else 4,
                "num_stages": 1}
    if wide and precision == "ieee":
        # full-fp32 dots (FFMA): the tf32 tiles spill (up to 36 KB at d128); these compile without spills for
        # head_dim 32/64/128, sm_80 and sm_90, padded and varlen + dropout (ptxas -v, triton 3.8). Not tuned.
        if kind == "fwd":
            block_m, block_n, num_warps = (32, 16, 8) if big_d else (64, 32, 8)
        elif kind == "bwd_dkdv":
            block_m, block_n, num_warps = 32, 32, 8
        else:
            block_m, block_n, num_warps = (64, 32, 8) if big_d else (32, 32, 4)
        return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps,
                "num_stages": 2}
    if kind == "fwd":
        # 128 query rows over 2 warpgroups (8 warps): 4 warps hit 255 registers and spill with dropout on
        block_m, block_n, num_warps = 128, 64, 8
        if wide:
            block_n = 32 if big_d else 64
        num_stages = 3 if capability >= 90 else 2
    elif kind == "bwd_dkdv":
        # the K and V block and the dK, dV accumulators stay in registers; Q and dO stream (pipelined)
        block_m, block_n, num_warps = 32, 128, 8
        if big_d or wide:
            block_m, block_n = 32, 64
        num_stages = 3 if capability >= 90 else 2
        if big_d and wide:
            if capability >= 90:
                # fp32 d128: 32 x 64 over 8 warps spills, and 32 x 32 over 8 warps leaves each warpgroup too
                # few key rows for wgmma (ptxas falls back to mma.sync); one warpgroup of 64 key rows with
                # 16-row query blocks compiles to HGMMA without spills (246 registers, checked with ptxas)
                block_m, block_n, num_warps, num_stages = 16, 64, 4, 2
            else:
                block_n = 32  # 32 x 64 spills (255 registers) with fp32 operands
        elif wide and capability < 90:
            # fp32 d<=64 on sm_80: 32 x 64 over 8 warps sits at 255 registers and spills 120 B with varlen +
            # dropout under triton 3.6; 16-row query blocks over 4 warps keep the 64-key tile at 202-230
            # registers without spills under triton 3.6 and 3.8 (ptxas -v)
            block_m, num_warps = 16, 4
    else:  # bwd_dq: the Q, dO block and the dQ accumulator stay in registers; K and V stream
        block_m, block_n, num_warps = 128, 32, 8
        if big_d or wide:
            block_m, block_n = 64, 32
        num_stages = 3 if capability >= 90 else 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": num_warps,
            "num_stages": num_stages}


def _capability(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# CUDA's limits on the launch grid: 2**31 - 1 programs on axis 0, 65535 on axes 1 and 2.
MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def launch_grid(max_seqlen: int, block: int, batch: int, heads: int) -> tuple[int]:
    """The grid of every attention kernel: one axis of cdiv(max_seqlen, block) row blocks x batch x heads
    (decoded by `_block_and_head`). batch * heads alone passes axis 1's limit of 65535 at BERT-base eval
    batches >= 5462, so nothing of it goes on axes 1 / 2."""
    n = triton.cdiv(max_seqlen, block) * batch * heads
    if n > MAX_GRID[0]:
        raise ValueError(f"attention: {n} programs (batch={batch} x heads={heads} x "
                         f"{triton.cdiv(max_seqlen, block)} row blocks) exceed CUDA's grid limit of {MAX_GRID[0]}; "
                         "split the batch")
    return (n,)


def dropout_mask_grid(max_seqlen: int, block: int, batch: int, heads: int) -> tuple[int, int]:
    """Grid of `_dropout_mask_kernel`: (query blocks x batch x heads, key blocks)."""
    return launch_grid(max_seqlen, block, batch, heads) + (triton.cdiv(max_seqlen, block),)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for these operands: float32 inputs use TF32 tensor cores exactly when torch's own
    float32 matmuls may (`torch.backends.cuda.matmul.allow_tf32`, i.e. torch.get_float32_matmul_precision() !=
    "highest"), so the attention kernels and the model's torch matmuls agree by construction; "ieee" otherwise.
    Half-precision operands are unaffected (they always use tensor cores); "tf32" is Triton's default there."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(q, k, v, varlen: bool):
    want = 3 if varlen else 4
    layout = "[total_tokens, heads, head_dim]" if varlen else "[batch, seqlen, heads, head_dim]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _launch.FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; attention supports float16, bfloat16, float32")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("q, k, v must share dtype and device")
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim={q.shape[-1]} is not supported (at most 256)")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _strides4(t, varlen: bool):
    """(batch, token, head) strides; varlen tensors have no batch dim (stride 0)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _seq_info(q, key_padding_mask, cu_seqlens, max_seqlen):
    """(varlen?, batch, max_seqlen, SEQ int32 tensor, uint8 mask or None)."""
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens must be 1-D [batch + 1]")
        if max_seqlen is None:
            raise ValueError("varlen attention needs max_seqlen")
        if max_seqlen >= 65536:
            raise ValueError("max_seqlen must be < 65536 (dropout counter layout)")
        return True, cu_seqlens.numel() - 1, int(max_seqlen), cu_seqlens.to(torch.int32).contiguous(), None
    b, s = q.shape[0], q.shape[1]
    if s >= 65536:
        raise ValueError("seqlen must be < 65536 (dropout counter layout)")
    if key_padding_mask is None:
        return False, b, s, torch.full((b,), s, dtype=torch.int32, device=q.device), None
    if key_padding_mask.shape != (b, s):
        raise ValueError(f"key_padding_mask must be [batch, seqlen] = {(b, s)}, got {tuple(key_padding_mask.shape)}")
    mask = key_padding_mask.to(device=q.device, dtype=torch.bool).contiguous()
    # extent = 1 + index of the last real token (0 when none); computed on the device, no host sync
    pos = torch.arange(1, s + 1, device=q.device, dtype=torch.int32)
    extent = torch.where(mask, pos, torch.zeros((), dtype=torch.int32, device=q.device)).amax(dim=1)
    return False, b, s, extent.to(torch.int32).contiguous(), mask.view(torch.uint8)


def fill_padding_rows(t: torch.Tensor, seq: torch.Tensor, value: float = 0.0) -> None:
    """Writes `value` into the rows t >= cu_seqlens[-1] (= seq[-1], read on the device: no host sync) of the varlen
    tensor t ([T, H, D] or [T, H, 1]-like views, any strides): the padding rows of a bucket-padded batch. One
    launch whose programs below cu_seqlens[-1] return at once."""
    n_rows = t.shape[0]
    if t.numel() == 0:
        return
    t3 = t.unsqueeze(-1) if t.dim() == 2 else t  # [T, H] -> [T, H, 1], a view
    rows, a, b = t3.shape
    width = a * b
    block_w = min(1024, triton.next_power_of_2(width))
    block_t = max(1, min(64, 4096 // block_w))
    grid = (triton.cdiv(rows, block_t), triton.cdiv(width, block_w))
    with _launch.device_guard(t):
        _zero_tail_kernel[grid](t3, seq, seq.numel() - 1, rows, a, b, *t3.stride(), float(value),
                                BLOCK_T=block_t, BLOCK_W=block_w)


def attention_forward(q, k, v, *, key_padding_mask=None, cu_seqlens=None, max_seqlen=None,
                      dropout_p: float = 0.0, softmax_scale: float | None = None, seed=0,
                      out=None, lse=None):
    """Fused attention forward. Padded (q [B, S, H, D] + optional bool key_padding_mask [B, S]) or varlen
    (q [T, H, D] + cu_seqlens int32 [B + 1] + max_seqlen). Returns (out like q, contiguous; lse float32
    [B, H, S] padded or [H, T] varlen, natural log, +inf at padded rows). `out`/`lse` may be given (tests
    pass NaN-filled buffers to prove every element is written).

    Varlen padding rows (issue 31): q, k, v may have T >= cu_seqlens[-1] rows; rows t >= cu_seqlens[-1] belong
    to no sequence: no real row attends to them, their out rows are 0 and their lse is +inf (the value padded
    query rows already have: the backward's P = exp(S - lse) is then exactly 0 there, and +inf never enters an
    output or a gradient)."""
    varlen = cu_seqlens is not None
    _check_inputs(q, k, v, varlen)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    varlen, batch, max_seqlen, seq, mask = _seq_info(q, key_padding_mask, cu_seqlens, max_seqlen)
    heads, head_dim = q.shape[-2], q.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        shape = (heads, q.shape[0]) if varlen else (batch, heads, max_seqlen)
        lse = torch.empty(shape, dtype=torch.float32, device=q.device)
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    if batch == 0 or q.numel() == 0:
        return out, lse
    precision = dot_precision(q.dtype)
    cfg = attention_config("fwd", head_dim, q.dtype, _capability(q.device), precision)
    grid = launch_grid(max_seqlen, cfg["BLOCK_M"], batch, heads)
    with _launch.device_guard(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse, mask if mask is not None else seq, seq,
            *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(out, varlen),
            *lse_strides, mask.stride(0) if mask is not None else 0,
            heads, max_seqlen, float(softmax_scale), float(dropout_p), _launch.seed_tensor(seed, q.device),
            HEAD_DIM=head_dim, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            IS_VARLEN=varlen, HAS_MASK=mask is not None, HAS_DROPOUT=dropout_p > 0.0,
            INPUT_PRECISION=precision, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if varlen:
        fill_padding_rows(out, seq, 0.0)
        fill_padding_rows(lse.t(), seq, float("inf"))
    return out, lse


def _grad_buffers(q, dq, dk, dv, dqkv):
    """(dq, dk, dv, dqkv) to write into. Unless the caller gives dq/dk/dv, they are the views dqkv.unbind(-3) of
    ONE [..., 3, heads, head_dim] buffer (given, or new), the layout of the fused QKV projection's output
    (bert.py views it as [T, 3, H, D]), so its gradient needs no stack / cat copy (issue 26)."""
    if dq is None and dk is None and dv is None:
        shape = tuple(q.shape[:-2]) + (3,) + tuple(q.shape[-2:])
        if dqkv is None:
            dqkv = torch.empty(shape, dtype=q.dtype, device=q.device)
        elif tuple(dqkv.shape) != shape or dqkv.dtype != q.dtype or not dqkv.is_contiguous():
            raise ValueError(f"dqkv must be contiguous {shape} of dtype {q.dtype}, got {tuple(dqkv.shape)} "
                             f"{dqkv.dtype}")
        return dqkv.unbind(-3) + (dqkv,)
    if dqkv is not None:
        raise ValueError("give either dqkv or dq/dk/dv, not both")
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    if dk is None and dv is None:
        # dK and dV share one allocation so the kernel has one set of strides for both
        dkv = torch.empty((2,) + tuple(q.shape), dtype=q.dtype, device=q.device)
        dk, dv = dkv[0], dkv[1]
    return dq, dk, dv, None


def attention_backward(do, q, k, v, out, lse, *, key_padding_mask=None, cu_seqlens=None, max_seqlen=None,
                       dropout_p: float = 0.0, softmax_scale: float | None = None, seed=0,
                       dq=None, dk=None, dv=None, dqkv=None):
    """Gradients (dq, dk, dv) of attention_forward, given its out and lse and the same arguments. Without
    dq/dk/dv given they are views of one [..., 3, heads, head_dim] buffer, `dqkv` or a new one (`_grad_buffers`).
    Varlen padding rows (t >= cu_seqlens[-1]) get exact zeros in dq, dk and dv."""
    varlen = cu_seqlens is not None
    _check_inputs(q, k, v, varlen)
    q, k, v, do = (_last_dim_contiguous(t) for t in (q, k, v, do))
    varlen, batch, max_seqlen, seq, mask = _seq_info(q, key_padding_mask, cu_seqlens, max_seqlen)
    heads, head_dim = q.shape[-2], q.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    dq, dk, dv, dqkv = _grad_buffers(q, dq, dk, dv, dqkv)
    if dk.stride() != dv.stride():
        raise ValueError("dk and dv must have the same strides")
    if batch == 0 or q.numel() == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    lse_strides = (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))
    cap = _capability(q.device)
    precision = dot_precision(q.dtype)
    mask_arg = mask if mask is not None else seq
    mask_stride = mask.stride(0) if mask is not None else 0
    common = dict(HEAD_DIM=head_dim, IS_VARLEN=varlen)

    cfg = attention_config("bwd_preprocess", head_dim, q.dtype, cap)
    with _launch.device_guard(q):
        _attn_bwd_preprocess_kernel[launch_grid(max_seqlen, cfg["BLOCK_M"], batch, heads)](
            out, do, delta, seq, *_strides4(out, varlen), *_strides4(do, varlen), *lse_strides, heads, max_seqlen,
            BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **common)

        flags = dict(common, HAS_MASK=mask is not None, HAS_DROPOUT=dropout_p > 0.0, INPUT_PRECISION=precision)
        scalars = (heads, max_seqlen, float(softmax_scale), float(dropout_p), _launch.seed_tensor(seed, q.device))
        cfg = attention_config("bwd_dkdv", head_dim, q.dtype, cap, precision)
        _attn_bwd_dkdv_kernel[launch_grid(max_seqlen, cfg["BLOCK_N"], batch, heads)](
            q, k, v, do, dk, dv, lse, delta, mask_arg, seq,
            *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(do, varlen),
            *_strides4(dk, varlen), *lse_strides, mask_stride, *scalars,
            BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags)

        cfg = attention_config("bwd_dq", head_dim, q.dtype, cap, precision)
        _attn_bwd_dq_kernel[launch_grid(max_seqlen, cfg["BLOCK_M"], batch, heads)](
            q, k, v, do, dq, lse, delta, mask_arg, seq,
            *_strides4(q, varlen), *_strides4(k, varlen), *_strides4(v, varlen), *_strides4(do, varlen),
            *_strides4(dq, varlen), *lse_strides, mask_stride, *scalars,
            BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **flags)
    if varlen:
        _zero_padding_grads(seq, dq, dk, dv, dqkv)
    return dq, dk, dv


def _zero_padding_grads(seq, dq, dk, dv, dqkv):
    """Zeros in the padding rows of dq, dk, dv: one launch over the packed [T, 3 * H, D] buffer when they are its
    views (the default), else one launch each."""
    if dqkv is not None:
        fill_padding_rows(dqkv.view(dqkv.shape[0], -1, dqkv.shape[-1]), seq, 0.0)
        return
    for t in (dq, dk, dv):
        fill_padding_rows(t, seq, 0.0)


def dropout_keep_mask(seed, dropout_p: float, batch: int, heads: int, max_seqlen: int,
                      device="cpu") -> torch.Tensor:
    """The keep mask the kernels draw for (seed, dropout_p): bool [batch, heads, max_seqlen, max_seqlen],
    True = kept; element [b, h, i, j] is query i, key j of sequence b (its local positions, padded or varlen).
    Dense: for tests at small sizes only."""
    out = torch.empty((batch * heads, max_seqlen, max_seqlen), dtype=torch.uint8, device=device)
    block = 64
    if out.numel() == 0:
        return out.view(batch, heads, max_seqlen, max_seqlen).to(torch.bool)
    _launch.check_runnable(out, "dropout_keep_mask")
    with _launch.device_guard(out):
        _dropout_mask_kernel[dropout_mask_grid(max_seqlen, block, batch, heads)](
            out, max_seqlen, float(dropout_p), _launch.seed_tensor(seed, out.device), BLOCK=block)
    return out.view(batch, heads, max_seqlen, max_seqlen).to(torch.bool)


# ----------------------------------------------------------------------------------------------------------
# GPU-compile contract
# ----------------------------------------------------------------------------------------------------------

def gpu_compile_cases(capability: int) -> list[dict]:
    """Every configuration the launchers pick at BERT shapes (seqlen 512, batch 32, 12 heads; head_dim
    32/64/128; fp16/bf16/fp32), padded with mask, no dropout, plus varlen with dropout at head_dim 64 (the
    constexpr flags do not change the tile sizes). bytes/flops are per launch at B=32, S=512, H=12.

    Each case also carries "attrs" ({(arg index,): [["tt.divisibility", 16]]}, the ASTSource `attrs`
    argument): the divisibility the JIT sees at these shapes. Compile with
    `ASTSource(fn, signature, constexprs, attrs)` to get the code that actually runs."""
    B, S, H = 32, 512, 12
    cases = []
    for head_dim in (32, 64, 128):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            ty = _launch.TL_NAME[dtype]
            es = torch.tensor([], dtype=dtype).element_size()
            tensor_bytes = B * S * H * head_dim * es
            row_bytes = B * S * H * 4
            fwd_flops = 4 * B * S * S * H * head_dim
            flag_sets = [(False, True, False)]
            if head_dim == 64:
                flag_sets.append((True, False, True))
            # float32 runs its dots in TF32 or in full fp32 (FFMA) depending on torch's setting (dot_precision)
            precisions = ("tf32", "ieee") if dtype == torch.float32 else ("tf32",)
            for (is_varlen, has_mask, has_dropout), precision in itertools.product(flag_sets, precisions):
                tag = f"d{head_dim}_{ty}" + ("_varlen_dropout" if is_varlen else "_padded_mask")
                tag += "_ieee" if precision == "ieee" else ""
                flags = {"IS_VARLEN": is_varlen, "HAS_MASK": has_mask, "HAS_DROPOUT": has_dropout,
                         "INPUT_PRECISION": precision}
                for kind, fn in (("fwd", _attn_fwd_kernel), ("bwd_dkdv", _attn_bwd_dkdv_kernel),
                                 ("bwd_dq", _attn_bwd_dq_kernel), ("bwd_preprocess", _attn_bwd_preprocess_kernel)):
                    if precision == "ieee" and "INPUT_PRECISION" not in fn.arg_names:
                        continue  # no tl.dot: the same kernel as the tf32 case
                    cfg = attention_config(kind, head_dim, dtype, capability, precision)
                    sig, consts, attrs = _signature(fn, ty, head_dim, cfg, flags)
                    if kind == "fwd":
                        nbytes, flops = 4 * tensor_bytes + row_bytes, fwd_flops
                    elif kind == "bwd_preprocess":
                        nbytes, flops = 2 * tensor_bytes + row_bytes, 2 * B * S * H * head_dim
                    elif kind == "bwd_dkdv":   # 4 S x S x D matmuls (S^T, dP^T, dV, dK)
                        nbytes, flops = 6 * tensor_bytes + 2 * row_bytes, 2 * fwd_flops
                    else:                      # 3 matmuls (S, dP, dQ)
                        nbytes, flops = 5 * tensor_bytes + 2 * row_bytes, 3 * fwd_flops // 2
                    case = {"name": f"attention_{kind}_{tag}", "fn": fn, "signature": sig,
                            "constexprs": consts, "attrs": attrs, "dtype": ty, "num_warps": cfg["num_warps"],
                            "num_stages": cfg["num_stages"], "uses_mma": kind != "bwd_preprocess",
                            "bytes": nbytes, "flops": flops}
                    if precision == "ieee":
                        case["input_precision"] = "ieee"
                    cases.append(case)
    return cases + _tail_fill_cases(B * S, H)


def _tail_fill_cases(tokens: int, heads: int) -> list[dict]:
    """`_zero_tail_kernel` as `fill_padding_rows` launches it at these shapes: out [T, H, D] per dtype, the packed
    dq/dk/dv [T, 3 * H, D] per dtype, lse [T, H, 1] float32 (bytes: the worst case, every row padding)."""
    cases = []
    shapes = [(ty, (heads, d), f"{ty}_d{d}") for ty in ("fp16", "bf16", "fp32") for d in (64,)]
    shapes += [(ty, (3 * heads, 64), f"{ty}_dqkv_d64") for ty in ("fp16", "bf16", "fp32")]
    shapes.append(("fp32", (heads, 1), "lse"))
    for ty, (a, b), tag in shapes:
        width = a * b
        block_w = min(1024, triton.next_power_of_2(width))
        block_t = max(1, min(64, 4096 // block_w))
        sig = {"PTR": "*" + ty, "SEQ": "*i32", "n_seqs": "i32", "n_rows": "i32", "A": "i32", "B": "i32",
               "stride_t": "i32", "stride_a": "i32", "stride_b": "i32", "value": "fp32",
               "BLOCK_T": "constexpr", "BLOCK_W": "constexpr"}
        es = {"fp16": 2, "bf16": 2, "fp32": 4}[ty]
        cases.append({"name": f"attention_zero_tail_{tag}", "fn": _zero_tail_kernel, "signature": sig,
                      "constexprs": {"BLOCK_T": block_t, "BLOCK_W": block_w}, "dtype": ty,
                      "attrs": _launch.divisibility_attrs(_zero_tail_kernel, sig, {"n_rows": tokens,
                                                                                   "stride_t": width}),
                      "num_warps": 4, "num_stages": 1, "uses_mma": False, "bytes": tokens * width * es, "flops": 0})
    return cases


def _signature(fn, ty: str, head_dim: int, cfg: dict, flags: dict):
    """Triton 3.x signature/constexprs for `fn` with tensors of type `ty`."""
    consts = {"HEAD_DIM": head_dim, "BLOCK_D": cfg["BLOCK_D"], "BLOCK_M": cfg["BLOCK_M"]}
    if "BLOCK_N" in fn.arg_names:
        consts["BLOCK_N"] = cfg["BLOCK_N"]
    for k, val in flags.items():
        if k in fn.arg_names:
            consts[k] = val
    pointer_types = {"LSE": "*fp32", "DELTA": "*fp32", "MASK": "*u8", "SEQ": "*i32", "SEED": "*i64"}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name.isupper():
            sig[name] = "*" + ty
        elif name in ("sm_scale", "dropout_p"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    # What the JIT specialises at these shapes: 16-byte aligned pointers and integers divisible by 16 (the
    # strides, seqlen) get tt.divisibility=16, which is what lets the loads vectorise and pipeline (cp.async /
    # TMA-free async copies). Without it the compiled code is not the one that runs.
    # (at B=32, S=512, H=12 every stride and the seqlen are multiples of 16; the head count is not)
    ints = {name: 16 for name in fn.arg_names if name.startswith(("stride_", "max_seqlen"))}
    return sig, consts, _launch.divisibility_attrs(fn, sig, ints)
