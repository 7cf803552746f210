"""exact: stage package of attnscope."""
