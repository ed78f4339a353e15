from draftcache.precompute.cli import main

if __name__ == "__main__":  # vLLM (--engine vllm) spawns processes that import the main module again
    main()
