"""later: stage package of attnscope."""
