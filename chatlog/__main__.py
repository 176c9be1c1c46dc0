from chatlog.cli import cli

cli(prog_name="chatlog")
