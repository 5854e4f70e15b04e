from agepipe.cli import main

if __name__ == "__main__":  # spawned Dask workers import this module again
    main()
