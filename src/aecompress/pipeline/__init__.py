"""How a compression runs, one layer above the methods: planning (which method fits which
group within which budget), the independent and sequential pipelines that feed each fit
its matrices and statistics, block refinement, and budget allocation."""
