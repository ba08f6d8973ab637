"""`python -m dsrecipes.compat`: one line per workaround (ok or RE-CHECK, the version it was verified against, the
installed one) and its upstream issue."""

from dsrecipes.compat.registry import report

for row in report():
    flag = "RE-CHECK" if row["recheck"] else "ok"
    print(f"{flag:<8} {row['workaround']:<38} {row['package']} {row['verified']} (installed {row['installed']})")
    print(f"         {row['issue']}")
