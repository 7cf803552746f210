"""circuit: stage package of attnscope."""
