"""The framework-free engine: argument readers, conventions, the attention problem,
dispatch to kernels, reference and blockwise tiles, the (out, lse) merge,
sequence layouts and the layers' shared logic. Imports no framework."""
