from draftcache.precompute.cli import main

main()
