"""neurons: stage package of attnscope."""
