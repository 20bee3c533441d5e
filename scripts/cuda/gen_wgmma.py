def mma(name, n, trans_b, a_regs=False):
    nreg = n // 2
    outs = ", ".join(f"%{i}" for i in range(nreg))
    cons = ", ".join(f'"+f"(d[{i}])' for i in range(nreg))
    s = []
    where = "A from registers (the mma.sync m16n8k16 A fragment of each warp's 16 rows), B from shared memory" if a_regs else "A and B from shared memory (descriptors)"
    s.append(f"// D[64 x {n}] (+)= A[64 x 16] B[16 x {n}], {where}, B {'N-major (imm-trans-b 1)' if trans_b else 'K-major'};")
    s.append(f"// `accumulate` 0 overwrites D. {nreg} f32 accumulators per thread (the m16n8 C layout, n8 tile j at d[4 j ..]).")
    a_arg = "const uint32_t (&a)[4]" if a_regs else "uint64_t da"
    s.append(f"__device__ __forceinline__ void {name}(float (&d)[{nreg}], {a_arg}, uint64_t db, int accumulate) {{")
    s.append("  asm volatile(")
    s.append('      "{\\n.reg .pred p;\\n"')
    acc_op = nreg + 5 if a_regs else nreg + 2
    s.append(f'      "setp.ne.b32 p, %{acc_op}, 0;\\n"')
    s.append(f'      "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 "')
    # split outs across lines
    regs = [f"%{i}" for i in range(nreg)]
    lines = []
    for i in range(0, nreg, 16):
        lines.append(", ".join(regs[i:i+16]))
    s.append('      "{"')
    for i, l in enumerate(lines):
        sep = ", " if i + 1 < len(lines) else ""
        s.append(f'      "{l}{sep}"')
    if a_regs:
        s.append(f'      "}}, {{%{nreg}, %{nreg+1}, %{nreg+2}, %{nreg+3}}}, %{nreg+4}, p, 1, 1, {1 if trans_b else 0};\\n}}\\n"')
    else:
        s.append(f'      "}}, %{nreg}, %{nreg+1}, p, 1, 1, 0, {1 if trans_b else 0};\\n}}\\n"')
    cl = [f'"+f"(d[{i}])' for i in range(nreg)]
    s.append("      : " + ", ".join(cl[:8]) + ("," if nreg > 8 else ""))
    for i in range(8, nreg, 8):
        s.append("        " + ", ".join(cl[i:i+8]) + ("," if i + 8 < nreg else ""))
    if a_regs:
        s.append('      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate));')
    else:
        s.append('      : "l"(da), "l"(db), "r"(accumulate));')
    s.append("}")
    return "\n".join(s)
print(mma("wgmma_m64n32k16_ss", 32, False))
print()
print(mma("wgmma_m64n256k16_ss_tb", 256, True))
print()
print(mma("wgmma_m64n32k16_ss_tb", 32, True))
print()
print(mma("wgmma_m64n64k16_rs", 64, False, a_regs=True))
