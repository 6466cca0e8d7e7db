"""Router studies: every (variant, seed) cell of a spec, run resumably with provenance, then
means, intervals and paired differences against a baseline (`llava-smoe study SPEC.yaml`)."""
