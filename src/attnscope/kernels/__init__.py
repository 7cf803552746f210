"""kernels: stage package of attnscope."""
