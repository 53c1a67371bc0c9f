"""The ``casepackets`` command line: one console script, one sub-command per job.

Secrets never reach the terminal except the tokens ``token``/``serve`` are asked to print.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from service.auth.permissions import Role
from service.auth.tokens import DevIssuer
from service.config import Settings, UnsafeSettings, get_settings
from service.crypto.issuer_keys import load_or_create_private_pem
from service.db import migrate as run_migrations

app = typer.Typer(
    name="casepackets",
    help="Per-professional case packets over pseudonymized records.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


def settings_or_exit() -> Settings:
    try:
        return get_settings()
    except (UnsafeSettings, ValueError) as exc:
        console.print(f"[red]configuration refused:[/red] {exc}")
        raise typer.Exit(2) from None


def dev_issuer(settings: Settings) -> DevIssuer:
    if not settings.dev_issuer:
        console.print("[red]the built-in issuer is off[/red] (CASEPACKETS_DEV_ISSUER=false)")
        raise typer.Exit(2)
    return DevIssuer(
        private_pem=load_or_create_private_pem(
            settings.dev_issuer_key_path, settings.jwt_algorithm
        ),
        algorithm=settings.jwt_algorithm,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
    )


@app.command()
def migrate() -> None:
    """Bring the database schema to the newest revision (Alembic)."""
    settings = settings_or_exit()
    settings.home.mkdir(parents=True, exist_ok=True)
    run_migrations(settings.resolved_database_url, settings.migrations_dir)
    console.print("schema is up to date")


@app.command()
def token(
    sub: Annotated[str, typer.Option(help="subject: the professional's or system's id")],
    role: Annotated[list[Role], typer.Option(help="role to grant; repeat for several")],
    ttl: Annotated[int, typer.Option(min=60, max=7 * 24 * 3600, help="lifetime in seconds")] = 3600,
) -> None:
    """Print a token from the built-in development issuer."""
    settings = settings_or_exit()
    issuer = dev_issuer(settings)
    print(
        issuer.mint(
            subject=sub,
            roles=[r.value for r in role],
            roles_claim=settings.roles_claim,
            ttl_seconds=ttl,
        )
    )


DEMO_SUBJECTS = {
    Role.PROFESSIONAL: "prof-001",
    Role.COORDINATOR: "coord-001",
    Role.SOURCE: "source-welfare",
    Role.AUDITOR: "auditor-001",
    Role.ANALYST: "analyst-001",
    Role.ADMIN: "admin-001",
}


def prepare(settings: Settings) -> None:
    """Everything the service needs before it serves: data folder, keys, schema."""
    settings.home.mkdir(parents=True, exist_ok=True)
    if settings.dev_issuer:
        dev_issuer(settings)
    run_migrations(settings.resolved_database_url, settings.migrations_dir)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="PORT", help="port to bind")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    print_tokens: Annotated[
        bool, typer.Option(help="print a demo token per role (built-in issuer only)")
    ] = True,
) -> None:
    """Prepare (keys, migrations) and serve the API."""
    import uvicorn

    settings = settings_or_exit()
    prepare(settings)
    if settings.dev_issuer and print_tokens:
        issuer = dev_issuer(settings)
        out = Console()
        out.print("\n[bold]casepackets[/bold] demo tokens (valid 12 hours):")
        for role, subject in DEMO_SUBJECTS.items():
            minted = issuer.mint(
                subject=subject,
                roles=[role.value],
                roles_claim=settings.roles_claim,
                ttl_seconds=12 * 3600,
            )
            out.print(f"\n[cyan]{role.value}[/cyan] ({subject}):", highlight=False)
            print(minted)
        out.print(
            f'\ntry:  curl -s -H "Authorization: Bearer $TOKEN" http://{host}:{port}/v1/me\n',
            highlight=False,
        )
    sys.stdout.flush()
    os.environ.setdefault("CASEPACKETS_HOME", str(Path(settings.home).resolve()))
    uvicorn.run(
        "service.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        access_log=True,
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
