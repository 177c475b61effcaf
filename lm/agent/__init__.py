"""Tools an assistant calls: the registry (`registry`: built-ins and users' `module:function`s,
their JSON schemas, and a runner that turns every failure into an error result) and the
built-in calculator (`calculator`: exact arithmetic from a small grammar, never `eval`)."""
