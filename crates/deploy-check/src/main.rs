//! `deploy-check`: runs every check of deploy/ and docker-compose.yml (in
//! parallel, as the tests do) and prints one report; exits 1 on any problem.
//! Build the service binaries first (`cargo build --workspace --bins`): the
//! checks read their `--help`.

use std::process::ExitCode;

use deploy_check::CHECKS;

fn main() -> ExitCode {
    let results: Vec<Result<(), String>> = std::thread::scope(|scope| {
        let running: Vec<_> = CHECKS
            .iter()
            .map(|check| scope.spawn(move || (check.run)().map_err(|err| format!("{err:#}"))))
            .collect();
        running
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|_| Err("panicked (message above)".to_owned()))
            })
            .collect()
    });
    let mut failed = 0;
    for (check, result) in CHECKS.iter().zip(&results) {
        match result {
            Ok(()) => println!("ok    {}", check.name),
            Err(problems) => {
                failed += 1;
                println!(
                    "FAIL  {}\n      {}",
                    check.name,
                    problems.replace('\n', "\n      ")
                );
            }
        }
    }
    println!("{} checks, {failed} failed", CHECKS.len());
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
