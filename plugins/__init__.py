"""lrq_deploy.plugins: Triton kernels for low-bit linear layers, their torch custom ops and the
kernel-backed torch backend. Imported lazily: `import lrq_deploy.plugins.ops` loads Triton
(and enables its interpreter when no CUDA device is present)."""
