"""core: stage package of attnscope."""
