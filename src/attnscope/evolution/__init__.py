"""evolution: stage package of attnscope."""
