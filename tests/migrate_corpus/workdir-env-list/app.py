import os

print(os.environ["GREETING"], os.environ["MODE"])
