"""Labs for teaching depth-parallelism with ssmpi: exercises that check themselves.

``labs/README.md`` has the tasks; ``python -m labs.check LAB ANSWER`` says whether an
answer is right (exit 0), not yet right (exit 1, with what is wrong), or cannot be read
(exit 2). ``python -m labs.check --list`` lists the labs.
"""
