"""Pure Triton kernels and their typed launchers (installed as fastformer_kernels).

Nothing here imports fastformer: each module holds an op's @triton.jit kernels and the
launchers that allocate outputs, choose tile shapes and launch them.
"""
