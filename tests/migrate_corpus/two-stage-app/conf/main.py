import os

lines = ["greeting: " + os.environ.get("GREETING", "(unset)"),
         "cwd: " + os.getcwd(),
         "discovery.type: " + os.environ.get("discovery.type", "(unset)")]
for name in ("run.txt", "built.txt"):
    with open(name) as handle:
        lines.append(handle.read().rstrip("\n"))
report = "\n".join(lines) + "\n"
print(report, end="")
with open("/out/report.txt", "w") as handle:
    handle.write(report)
