import argparse

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, required=True)
for i in range(ap.parse_args().n):
    print(f"line {i}")
